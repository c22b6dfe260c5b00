"""Ray node labels that tie a Ray node to the node the control plane knows.

The agent starts its Ray node with these labels; the site launcher pins every
placement-group bundle to its chosen node with ``{NODE_LABEL: node name}``, and reads them
back from Ray to tell the control plane which nodes Ray has alive.
"""

from __future__ import annotations

NODE_LABEL = "andromeda.io/node"
PROVIDER_LABEL = "andromeda.io/provider"
SITE_LABEL = "andromeda.io/site"
LEVEL_LABEL = "andromeda.io/level"
GPU_MODEL_LABEL = "andromeda.io/gpu-model"


def node_labels(
    *, node: str, provider: str, site: str, level: str, gpu_models: list[str] | None = None
) -> dict[str, str]:
    """The labels of a node's Ray node. ``gpu_models`` are its GPUs' canonical models: the
    label is that model, or ``mixed`` for a host with several."""
    labels = {NODE_LABEL: node, PROVIDER_LABEL: provider, SITE_LABEL: site, LEVEL_LABEL: level}
    models = sorted(set(gpu_models or ()))
    if models:
        labels[GPU_MODEL_LABEL] = models[0] if len(models) == 1 else "mixed"
    return labels
