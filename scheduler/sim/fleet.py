"""Simulated fleets from YAML: providers with a commitment level, committed GPU-hours per
month, and node groups.

    providers:
      - name: orion                      # unique
        level: reserved                  # reserved | committed | spot
        committed_gpu_hours_per_month: 100000   # optional: fairness and fulfilment
        sites: 1                         # optional: node groups are dealt round-robin
        nodes:
          - {count: 20, gpus: 8, model: H100-80GB}            # memory from the model name
          - {count: 4, gpus: 8, model: H200-141GB, memory_gb: 141}

Node ids are 1.. in file order; a provider's id is its position (1-based). Every mistake is
reported with where it is (``providers[2].nodes[0].gpus: must be a whole number >= 1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scheduler.domain.enums import CommitmentLevel
from scheduler.domain.gpu_models import canonical_model
from scheduler.sim.replay import NodeSpec

DEFAULT_FLEET = Path(__file__).parent / "fleets" / "philly-64.yaml"


class FleetError(ValueError):
    """A fleet file that cannot be used; the message says where and why."""


@dataclass
class Fleet:
    nodes: list[NodeSpec]
    provider_names: dict[int, str]
    levels: dict[int, CommitmentLevel]
    commitments: dict[int, int] = field(default_factory=dict)  # GPU-seconds per 30 days

    @property
    def total_gpus(self) -> int:
        return sum(n.total_gpus for n in self.nodes)


def load_fleet(path: Path) -> Fleet:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FleetError(f"{path}: cannot read the fleet file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise FleetError(f"{path}: not valid YAML ({exc})") from None
    try:
        return fleet_from(data)
    except FleetError as exc:
        raise FleetError(f"{path}: {exc}") from None


def fleet_from(data: Any) -> Fleet:
    if not isinstance(data, dict) or not isinstance(data.get("providers"), list):
        raise FleetError("a fleet is a mapping with a list of providers")
    if not data["providers"]:
        raise FleetError("providers: at least one is needed")
    extra = sorted(set(data) - {"providers"})
    if extra:
        raise FleetError(f"unknown key {', '.join(extra)} (a fleet has: providers)")
    fleet = Fleet([], {}, {})
    for i, p in enumerate(data["providers"]):
        where = f"providers[{i}]"
        if not isinstance(p, dict):
            raise FleetError(f"{where}: a provider is a mapping (name, level, nodes)")
        unknown = sorted(
            set(p) - {"name", "level", "committed_gpu_hours_per_month", "nodes", "sites"}
        )
        if unknown:
            raise FleetError(f"{where}: unknown key {', '.join(unknown)}")
        name = p.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
            raise FleetError(f"{where}.name: a lowercase name (letters, digits, dashes) is needed")
        if name in fleet.provider_names.values():
            raise FleetError(f"{where}.name: {name!r} appears twice")
        try:
            level = CommitmentLevel(str(p.get("level")))
        except ValueError:
            choices = ", ".join(lv.value for lv in CommitmentLevel)
            raise FleetError(f"{where}.level: one of {choices}, not {p.get('level')!r}") from None
        pid = i + 1
        fleet.provider_names[pid] = name
        fleet.levels[pid] = level
        hours = p.get("committed_gpu_hours_per_month")
        if hours is not None:
            fleet.commitments[pid] = (
                _whole(hours, f"{where}.committed_gpu_hours_per_month", 0) * 3600
            )
        sites = _whole(p.get("sites", 1), f"{where}.sites", 1)
        groups = p.get("nodes")
        if not isinstance(groups, list) or not groups:
            raise FleetError(f"{where}.nodes: a list of node groups (count, gpus, model) is needed")
        for j, g in enumerate(groups):
            _add_group(fleet, g, f"{where}.nodes[{j}]", pid, name, level, sites)
    return fleet  # commitments are per 30 days, the simulator's period (MONTH_S)


def _add_group(
    fleet: Fleet,
    g: Any,
    where: str,
    pid: int,
    name: str,
    level: CommitmentLevel,
    sites: int,
) -> None:
    if not isinstance(g, dict):
        raise FleetError(f"{where}: a node group is a mapping (count, gpus, model)")
    unknown = sorted(set(g) - {"count", "gpus", "model", "memory_gb"})
    if unknown:
        raise FleetError(f"{where}: unknown key {', '.join(unknown)}")
    count = _whole(g.get("count"), f"{where}.count", 1)
    gpus = _whole(g.get("gpus"), f"{where}.gpus", 1)
    raw_model = g.get("model", "H100-80GB")
    model = canonical_model(str(raw_model))
    memory_gb = g.get("memory_gb")
    if memory_gb is None:
        m = re.search(r"(\d+)GB$", model)
        if not m:
            raise FleetError(f"{where}.memory_gb: needed, {model!r} does not say its memory")
        memory_gb = int(m.group(1))
    memory = _whole(memory_gb, f"{where}.memory_gb", 1) * 10**9
    for _ in range(count):
        node_id = len(fleet.nodes) + 1
        site = sum(1 for n in fleet.nodes if n.provider_id == pid) % sites
        fleet.nodes.append(
            NodeSpec(
                node_id=node_id,
                name=f"{name}-{node_id}",
                provider_id=pid,
                level=level,
                gpu_model=model,
                gpu_memory_bytes=memory,
                total_gpus=gpus,
                site_id=site,
                site_name=f"{name}-{site}" if sites > 1 else name,
            )
        )


def _whole(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FleetError(f"{where}: must be a whole number >= {minimum}, not {value!r}")
    return value
