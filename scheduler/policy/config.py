"""The placement policy's knobs, as data: commitment steering, preemption, backfill, fairness.

``DEFAULT_CONFIG`` is what the server and the simulator use unless told otherwise; a
deployment overrides it with a YAML (or JSON) file (``ANDROMEDA_POLICY_CONFIG``, or
``andromeda simulate --policy-config``) with any of the keys below. Unknown keys and bad
values are refused with a sentence that says which and why.

Commitment steering (``steering``): for each priority class, the commitment levels its
work may use, most preferred first (a nested list groups equally good levels: fairness to
providers decides between them). A level that is not listed is never used. With
``spot_needs_checkpointing`` a job goes to spot capacity only when it is preemptible and
checkpoints (the provider may take spot capacity back at any time). The default mapping:

    class     levels, in order of preference        spot only when preemptible + checkpointing
    critical  reserved, committed, spot              yes
    high      reserved, committed, spot              yes
    normal    reserved, committed, spot              no
    low       spot, committed, reserved              no

Preemption: a job may stop running work of strictly lower priority that is preemptible,
has run ``min_runtime_s`` and is not already stopping. Victims are chosen by the
GPU-seconds they would lose since their last checkpoint (fewest first), and the
preemption happens only when the GPU-seconds of waiting it spares the job (its GPUs times
how much sooner it starts than it would without preempting, capped at
``default_runtime_s``) are at least ``preempt_gain_factor`` times that loss. Victims get
``preempt_grace_s`` to checkpoint and exit (SIGTERM, then SIGKILL at the deadline).
At most ``max_preemptions_per_cycle`` jobs preempt in one cycle. ``victim_order:
priority`` picks victims lowest priority first, then newest, as Kueue does.

Backfill: the first ``reservation_depth`` jobs (in queue order) that do not fit get a
reservation, and so does any job that has waited ``starving_after_s``; a lower job may use
the GPUs a reservation counts on only when it is expected to end before the reservation
starts. Only reservations starting within ``backfill_window_s`` hold GPUs; further ahead
they are a forecast shown in the job's reason. Expected ends come from ``max_runtime``;
without one a job is expected to run ``default_runtime_s``, or, once it has run longer
than that, as long again as it has run.

Fairness: among placements equally good by commitment level, the provider furthest behind
its commitment for the period (delivered / committed GPU-seconds so far) is preferred;
each placement counts ``fairness_horizon_s`` of its GPUs towards its provider for the rest
of the cycle, so one cycle spreads work rather than filling the furthest-behind provider.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from scheduler.domain.enums import PRIORITY_VALUES, CommitmentLevel, PriorityClass

R, C, S = CommitmentLevel.reserved, CommitmentLevel.committed, CommitmentLevel.spot


class PolicyConfigError(ValueError):
    """A policy configuration that cannot be used; the message says what to change."""


@dataclass(frozen=True, slots=True)
class Steering:
    """Where one priority class's work may run, most preferred level first. ``tiers`` gives
    each level's preference (equal values: equally good, so fairness to providers decides
    between them); None: 0, 1, 2, ... in order."""

    levels: tuple[CommitmentLevel, ...]
    spot_needs_checkpointing: bool = False
    tiers: tuple[int, ...] | None = None

    def tier(self, index: int) -> int:
        return index if self.tiers is None else self.tiers[index]

    def grouped(self) -> list[list[CommitmentLevel]]:
        """The levels as preference groups, most preferred first."""
        groups: dict[int, list[CommitmentLevel]] = {}
        for i, level in enumerate(self.levels):
            groups.setdefault(self.tier(i), []).append(level)
        return [groups[t] for t in sorted(groups)]


DEFAULT_STEERING: Mapping[PriorityClass, Steering] = {
    PriorityClass.critical: Steering((R, C, S), spot_needs_checkpointing=True),
    PriorityClass.high: Steering((R, C, S), spot_needs_checkpointing=True),
    PriorityClass.normal: Steering((R, C, S)),
    PriorityClass.low: Steering((S, C, R)),
}


def class_of(priority: int) -> PriorityClass:
    """The priority class a numeric priority falls in (critical >= 1000, high >= 100, ...)."""
    for cls in (PriorityClass.critical, PriorityClass.high, PriorityClass.normal):
        if priority >= PRIORITY_VALUES[cls]:
            return cls
    return PriorityClass.low


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    steering: Mapping[PriorityClass, Steering] = field(default_factory=lambda: DEFAULT_STEERING)
    preemption: bool = True
    min_runtime_s: int = 600
    preempt_gain_factor: Fraction = Fraction(2)
    preempt_grace_s: int = 30
    max_preemptions_per_cycle: int = 32
    victim_order: str = "loss"  # or "priority": lowest priority, then newest (Kueue's)
    backfill: bool = True
    reservation_depth: int = 16
    backfill_window_s: int = 4 * 3600
    starving_after_s: int = 6 * 3600
    default_runtime_s: int = 24 * 3600
    fairness: bool = True
    fairness_horizon_s: int = 3600

    def expected_end(self, since_s: int, max_runtime_s: int | None, now_s: int) -> int:
        """When work that began at ``since_s`` is expected to end (module docstring); never
        before the next second."""
        if max_runtime_s is not None:
            end = since_s + max_runtime_s
        else:
            end = since_s + max(self.default_runtime_s, 2 * (now_s - since_s))
        return max(end, now_s + 1)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "steering":
                value = {
                    cls.value: {
                        "levels": [
                            g[0].value if len(g) == 1 else [lv.value for lv in g]
                            for g in st.grouped()
                        ],
                        "spot_needs_checkpointing": st.spot_needs_checkpointing,
                    }
                    for cls, st in value.items()
                }
            elif isinstance(value, Fraction):
                value = str(value)
            out[f.name] = value
        return out

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PolicyConfig:
        """A config from DEFAULT_CONFIG with ``data``'s keys replaced; refuses bad input."""
        if not isinstance(data, Mapping):
            raise PolicyConfigError("a policy config is a mapping of keys to values")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise PolicyConfigError(
                f"unknown policy setting {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        changes: dict[str, Any] = {}
        for key, value in data.items():
            default = getattr(DEFAULT_CONFIG, key)
            if key == "steering":
                changes[key] = _steering(value)
            elif key == "victim_order":
                if value not in ("loss", "priority"):
                    raise PolicyConfigError(f"victim_order is loss or priority, not {value!r}")
                changes[key] = value
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise PolicyConfigError(f"{key} must be true or false, not {value!r}")
                changes[key] = value
            elif isinstance(default, Fraction):
                try:
                    frac = Fraction(str(value))
                except (ValueError, ZeroDivisionError):
                    raise PolicyConfigError(f"{key} must be a number, not {value!r}") from None
                if frac < 0:
                    raise PolicyConfigError(f"{key} must be >= 0, not {value}")
                changes[key] = frac
            else:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise PolicyConfigError(f"{key} must be a whole number >= 0, not {value!r}")
                changes[key] = value
        return replace(DEFAULT_CONFIG, **changes)

    @classmethod
    def from_file(cls, path: Path) -> PolicyConfig:
        """Load a YAML or JSON file (by suffix; YAML is a superset of JSON anyway)."""
        import yaml

        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text) or {}
        except OSError as exc:
            raise PolicyConfigError(f"{path}: cannot read it ({exc.strerror})") from None
        except (ValueError, yaml.YAMLError) as exc:
            raise PolicyConfigError(f"{path}: not valid YAML or JSON ({exc})") from None
        try:
            return cls.from_mapping(data)
        except PolicyConfigError as exc:
            raise PolicyConfigError(f"{path}: {exc}") from None


def _steering(value: Any) -> Mapping[PriorityClass, Steering]:
    if not isinstance(value, Mapping):
        raise PolicyConfigError("steering maps priority classes to {levels: [...]}")
    out = dict(DEFAULT_STEERING)
    for name, entry in value.items():
        try:
            cls = PriorityClass(name)
        except ValueError:
            choices = ", ".join(c.value for c in PriorityClass)
            raise PolicyConfigError(
                f"steering: unknown priority class {name!r} ({choices})"
            ) from None
        if isinstance(entry, list):
            entry = {"levels": entry}
        if not isinstance(entry, Mapping) or "levels" not in entry:
            raise PolicyConfigError(f"steering.{name} needs levels: a list of commitment levels")
        levels: list[CommitmentLevel] = []
        tiers: list[int] = []
        if not isinstance(entry["levels"], list):
            raise PolicyConfigError(f"steering.{name}.levels must be a list")
        for tier, group in enumerate(entry["levels"]):
            # a nested list is a group of equally good levels (fairness decides among them)
            for level in group if isinstance(group, list) else [group]:
                try:
                    levels.append(CommitmentLevel(level))
                except ValueError:
                    choices = ", ".join(lv.value for lv in CommitmentLevel)
                    raise PolicyConfigError(
                        f"steering.{name}: unknown commitment level {level!r} ({choices})"
                    ) from None
                tiers.append(tier)
        if not levels or len(set(levels)) != len(levels):
            raise PolicyConfigError(f"steering.{name}.levels must list distinct levels, >= 1")
        extra = sorted(set(entry) - {"levels", "spot_needs_checkpointing"})
        if extra:
            raise PolicyConfigError(f"steering.{name}: unknown key {', '.join(extra)}")
        spot_ck = entry.get("spot_needs_checkpointing", False)
        if not isinstance(spot_ck, bool):
            raise PolicyConfigError(f"steering.{name}.spot_needs_checkpointing must be true/false")
        flat = tiers == list(range(len(levels)))
        out[cls] = Steering(tuple(levels), spot_ck, None if flat else tuple(tiers))
    return out


DEFAULT_CONFIG = PolicyConfig()
