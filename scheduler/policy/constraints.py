"""Which nodes a job may use: GPU model and memory, commitment steering, agreement dates.

These are the hard rules; a placement that breaks one is invalid (see ``validate.py``).
"""

from __future__ import annotations

from scheduler.domain.enums import CommitmentLevel
from scheduler.domain.gpu_models import model_matches
from scheduler.policy.config import PolicyConfig, class_of
from scheduler.policy.types import JobRequest, NodeView


def node_matches(job: JobRequest, gpu_model: str, gpu_memory_bytes: int) -> bool:
    """True when a node with this GPU model and per-GPU memory satisfies the job's constraints."""
    if job.gpu_model is not None and not model_matches(job.gpu_model, gpu_model):
        return False
    return job.min_gpu_memory_bytes is None or gpu_memory_bytes >= job.min_gpu_memory_bytes


def describe_constraint(job: JobRequest) -> str:
    """E.g. ``"H200 GPUs with >= 141 GB"``; used in pending reasons."""
    text = f"{job.gpu_model} GPUs" if job.gpu_model else "GPUs"
    if job.min_gpu_memory_bytes is not None:
        text += f" with >= {_gb(job.min_gpu_memory_bytes)} GB"
    return text


def _gb(num_bytes: int) -> str:
    value = num_bytes / 10**9
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def allowed_levels(job: JobRequest, config: PolicyConfig) -> tuple[CommitmentLevel, ...]:
    """The commitment levels ``job`` may run on, most preferred first (config steering)."""
    steering = config.steering[class_of(job.priority)]
    if steering.spot_needs_checkpointing and not (job.preemptible and job.checkpointing):
        return tuple(lv for lv in steering.levels if lv is not CommitmentLevel.spot)
    return steering.levels


def level_preference(job: JobRequest, config: PolicyConfig) -> tuple[int | None, ...]:
    """Indexed by ``CommitmentLevel.rank``: the job's preference for that level (0 best), or
    None where it may not run."""
    allowed = set(allowed_levels(job, config))
    steering = config.steering[class_of(job.priority)]
    prefs: list[int | None] = [None] * len(CommitmentLevel)
    for i, level in enumerate(steering.levels):
        if level in allowed:
            prefs[level.rank] = steering.tier(i)
    return tuple(prefs)


def describe_levels(job: JobRequest, config: PolicyConfig) -> str:
    levels = allowed_levels(job, config)
    text = ", ".join(lv.value for lv in levels) or "no"
    steering = config.steering[class_of(job.priority)]
    if (
        steering.spot_needs_checkpointing
        and CommitmentLevel.spot in steering.levels
        and CommitmentLevel.spot not in levels
    ):
        text += " (spot only for preemptible jobs that checkpoint)"
    return text


def in_force(node: NodeView, now_s: int) -> bool:
    """The node's agreement has not ended."""
    return node.agreement_ends_s is None or node.agreement_ends_s > now_s
