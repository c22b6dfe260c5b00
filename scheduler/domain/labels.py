"""Ray node labels that tie a Ray node to the node the control plane knows.

The agent starts its Ray worker with these labels; the Ray backend pins every placement-group
bundle to its chosen node with ``{NODE_LABEL: node name}``.
"""

from __future__ import annotations

NODE_LABEL = "andromeda.io/node"
PROVIDER_LABEL = "andromeda.io/provider"
LEVEL_LABEL = "andromeda.io/level"


def node_labels(*, node: str, provider: str, level: str) -> dict[str, str]:
    return {NODE_LABEL: node, PROVIDER_LABEL: provider, LEVEL_LABEL: level}
