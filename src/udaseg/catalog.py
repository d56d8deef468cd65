"""Explicit name -> import-path tables of the built-in components (house style G4).

YAML configs may use these short names (``name: cityscapes``) or full ``class_path`` entries.
Nothing is imported until a name is resolved, so importing this module is free.
"""

from __future__ import annotations

import importlib

DATASETS: dict[str, str] = {
    "cityscapes": "udaseg.data.datasets.cityscapes:Cityscapes",
    "dark_zurich": "udaseg.data.datasets.dark_zurich:DarkZurich",
}


def resolve(table: dict[str, str], name: str, what: str):
    """Import and return the object registered under ``name`` in ``table``."""
    try:
        target = table[name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ValueError(f"unknown {what} {name!r}; known {what}s: {known}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
