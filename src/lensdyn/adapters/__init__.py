"""TransformerLens architecture adapters lensdyn adds (TransformerLens 4 has none for these families).

``register()`` installs them in TransformerLens' adapter registry; call it once before
``TransformerBridge.boot_transformers``. It is idempotent and cheap.
"""
from __future__ import annotations


def register() -> None:
    """Register every lensdyn adapter with TransformerLens (now: ALBERT)."""
    from lensdyn.adapters import albert

    albert.register()


__all__ = ["register"]
