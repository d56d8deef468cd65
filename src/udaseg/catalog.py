"""Explicit name -> import-path tables of the built-in components (house style G4).

YAML configs may use these short names (``name: cityscapes``) or full ``class_path`` entries.
Nothing is imported until a name is resolved, so importing this module is free.
"""

from __future__ import annotations

import importlib

from .configparse import config_from_dict  # noqa: F401  (re-exported: the parser of method blocks)

DATASETS: dict[str, str] = {
    "cityscapes": "udaseg.data.datasets.cityscapes:Cityscapes",
    "cityscapes_cem": "udaseg.data.enhance:CityscapesCEM",
    "gta": "udaseg.data.datasets.gta:GTA5",
    "synthia": "udaseg.data.datasets.synthia:Synthia",
    "dark_zurich": "udaseg.data.datasets.dark_zurich:DarkZurich",
    "acdc": "udaseg.data.datasets.acdc:ACDC",
    "nighttime_driving": "udaseg.data.datasets.nighttime_driving:NighttimeDriving",
    "bdd100k_night": "udaseg.data.datasets.bdd100k_night:BDD100kNight",
    "dsec_night": "udaseg.data.datasets.dsec:DSECNightSemantic",
    "folder": "udaseg.data.datasets.folder:FolderDataset",
}


def resolve(table: dict[str, str], name: str, what: str):
    """Import and return the object registered under ``name`` in ``table``."""
    try:
        target = table[name]
    except KeyError:
        from .errors import ConfigError

        known = ", ".join(sorted(table))
        raise ConfigError(f"unknown {what} {name!r}; known {what}s: {known}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


# Methods: name -> "module:build". Each method module exposes ``build(settings: dict, student)``
# returning its hooks (udaseg.adapt.hooks protocols); a new method adds one line here.
METHODS: dict[str, str] = {
    "fd": "udaseg.adapt.methods.fd:build",
    "mic": "udaseg.adapt.methods.mic:build",
    "ciss": "udaseg.adapt.methods.ciss:build",
    "refign": "udaseg.adapt.methods.refign:build",
    "dsrnss": "udaseg.adapt.methods.dsrnss:build",
    "icda": "udaseg.adapt.methods.icda:build",
    "cdda": "udaseg.adapt.methods.cdda:build",
}


HOOK_KINDS = ("target_transform", "refiner", "mixer", "mixed_transform", "aux_loss")


class MethodHooks:
    """The hooks contributed by the configured methods, grouped by extension point.

    A hook states its extension point in ``hook_kind`` (one of :data:`HOOK_KINDS`); without it,
    an AuxLoss is recognised by its ``stage`` and everything else callable as a LabelRefiner.
    """

    def __init__(self) -> None:
        self.target_transforms: list = []
        self.refiners: list = []
        self.mixer = None
        self.mixed_transforms: list = []
        self.aux_losses: list = []

    def add(self, hook) -> None:
        from .adapt.hooks import AuxLoss, LabelRefiner

        kind = getattr(hook, "hook_kind", None)
        if kind is None:
            if isinstance(hook, AuxLoss) and hasattr(hook, "stage"):
                kind = "aux_loss"
            elif isinstance(hook, LabelRefiner):
                kind = "refiner"
        if kind == "aux_loss":
            self.aux_losses.append(hook)
        elif kind == "mixer":
            if self.mixer is not None:
                raise ValueError("two configured methods both replace the mixer; keep one")
            self.mixer = hook
        elif kind == "refiner":
            self.refiners.append(hook)
        elif kind == "target_transform":
            self.target_transforms.append(hook)
        elif kind == "mixed_transform":
            self.mixed_transforms.append(hook)
        else:
            raise TypeError(
                f"{hook!r} implements no udaseg.adapt.hooks protocol (hook_kind {kind!r}; "
                f"expected one of {HOOK_KINDS})"
            )


def build_methods(methods: dict[str, dict], student) -> MethodHooks:
    """Build the hooks of every configured method, in the order given."""
    hooks = MethodHooks()
    for name, settings in methods.items():
        build = resolve(METHODS, name, "method")
        for hook in build(dict(settings or {}), student):
            hooks.add(hook)
    return hooks
