"""The reward policy as versioned data: rates per revenue stream, volume-bonus tiers,
GPU-model weights and the weight of ancestors' training hours.

Version 1 is the reward matrix of the partnership strategy (seeded by migration 0003; this
module's ``DEFAULT_POLICY`` must equal it, which a test checks). A new version applies from
its ``effective_from``: a statement uses the version in force at the start of its period and
records its number. An agreement may override rates for its provider
(``Agreement.reward_overrides``, e.g. ``{"api_usage": "0.12"}``).

Every number is a decimal string in storage and a ``Fraction`` in computation: exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from fractions import Fraction
from typing import Any


class Stream(StrEnum):
    """Revenue streams of the reward matrix."""

    api_usage = "api_usage"  # model version; 10% of revenue, pro rata by training hours
    subscription = "subscription"  # model version; 5%, pro rata
    upgrade = "upgrade"  # model version; a fixed sum per free-to-paid upgrade, pro rata
    licence = "licence"  # model version; 7%, pro rata
    consulting = "consulting"  # the provider that sourced the deal; 5%
    custom_dev = "custom_dev"  # the facilitating provider; the deal's own 5-10%
    dedicated_capacity = "dedicated_capacity"  # the buying provider; a 20% discount (no payout)

    @property
    def by_training(self) -> bool:
        """Split across the providers whose GPUs trained the model version."""
        return self in _BY_TRAINING


_BY_TRAINING = frozenset({Stream.api_usage, Stream.subscription, Stream.upgrade, Stream.licence})

# rate keys: a stream's share of revenue; "upgrade" is a fixed amount (currency) per upgrade;
# custom development carries its own rate per deal, bounded by the two custom_dev_* keys.
DEFAULT_RATES = {
    "api_usage": "0.10",
    "subscription": "0.05",
    "upgrade": "2.00",
    "licence": "0.07",
    "consulting": "0.05",
    "custom_dev_min": "0.05",
    "custom_dev_max": "0.10",
    "dedicated_capacity": "0.20",
}
# The tier reached by a provider's normalised GPU-hours in the period sets the bonus per
# normalised GPU-hour for all of them.
DEFAULT_TIERS = [
    {"name": "none", "from_hours": "0", "per_hour": "0"},
    {"name": "bronze", "from_hours": "1000", "per_hour": "0.05"},
    {"name": "silver", "from_hours": "10000", "per_hour": "0.10"},
    {"name": "gold", "from_hours": "100000", "per_hour": "0.15"},
]
# Normalised compute units per GPU-hour, relative to an H100 (dense BF16 tensor throughput;
# H200 +15% for its larger, faster memory). Looked up by the canonical model ("H100-80GB"),
# then by its family ("H100"), then "default".
DEFAULT_GPU_WEIGHTS = {
    "B200": "2.25",
    "H200": "1.15",
    "H100": "1.00",
    "A100": "0.32",
    "L40S": "0.37",
    "A10": "0.13",
    "L4": "0.12",
    "V100": "0.13",
    "T4": "0.07",
    "default": "0.10",
}
DEFAULT_ANCESTOR_WEIGHT = "0.5"  # a fine-tune's parent counts half, its grandparent a quarter
MAX_ANCESTRY = 8
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class RewardPolicy:
    version: int
    effective_from: datetime
    rates: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_RATES))
    bonus_tiers: list[dict[str, str]] = field(default_factory=lambda: list(DEFAULT_TIERS))
    gpu_weights: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_GPU_WEIGHTS))
    ancestor_weight: str = DEFAULT_ANCESTOR_WEIGHT
    note: str = ""

    def rate(self, key: str, overrides: dict[str, str] | None = None) -> Fraction:
        value = (overrides or {}).get(key, self.rates.get(key))
        if value is None:
            raise KeyError(f"reward policy {self.version} has no rate {key!r}")
        return Fraction(value)

    def gpu_weight(self, gpu_model: str) -> Fraction:
        family = gpu_model.split("-", 1)[0]
        for key in (gpu_model, family, "default"):
            if key in self.gpu_weights:
                return Fraction(self.gpu_weights[key])
        return Fraction(0)

    def tier(self, normalised_hours: Fraction) -> dict[str, str]:
        reached = [t for t in self.bonus_tiers if normalised_hours >= Fraction(t["from_hours"])]
        return (
            max(reached, key=lambda t: Fraction(t["from_hours"]))
            if reached
            else {
                "name": "none",
                "from_hours": "0",
                "per_hour": "0",
            }
        )

    @property
    def generation_weight(self) -> Fraction:
        return Fraction(self.ancestor_weight)

    def row(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "effective_from": self.effective_from,
            "rates": dict(self.rates),
            "bonus_tiers": list(self.bonus_tiers),
            "gpu_weights": dict(self.gpu_weights),
            "ancestor_weight": self.ancestor_weight,
            "note": self.note,
        }


DEFAULT_POLICY = RewardPolicy(
    version=1,
    effective_from=EPOCH,
    note="the reward matrix of the partnership strategy",
)


def validate_rates(rates: dict[str, str]) -> None:
    """Raise ``ValueError`` naming a rate that is not a decimal in [0, 1] (upgrade: >= 0)."""
    for key, value in rates.items():
        try:
            number = Fraction(value)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"rate {key!r}: {value!r} is not a decimal number") from None
        if number < 0 or (key != "upgrade" and number > 1):
            raise ValueError(f"rate {key!r}: {value} must be between 0 and 1")
