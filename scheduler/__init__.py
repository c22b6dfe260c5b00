"""Andromeda compute scheduler: control plane, placement policy, ledger."""

__version__ = "0.1.0"
