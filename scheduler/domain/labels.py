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


def node_labels(*, node: str, provider: str, site: str, level: str) -> dict[str, str]:
    return {NODE_LABEL: node, PROVIDER_LABEL: provider, SITE_LABEL: site, LEVEL_LABEL: level}
