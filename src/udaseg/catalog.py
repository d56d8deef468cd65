"""Explicit name -> import-path tables of the built-in components (house style G4).

YAML configs may use these short names (``name: cityscapes``) or full ``class_path`` entries.
Nothing is imported until a name is resolved, so importing this module is free.
"""

from __future__ import annotations

import importlib

DATASETS: dict[str, str] = {
    "cityscapes": "udaseg.data.datasets.cityscapes:Cityscapes",
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


# Methods: name -> "module:function" where function(settings: dict, student) returns the list of
# hooks (udaseg.adapt.hooks protocols) that the method contributes.
METHODS: dict[str, str] = {
    "fd": "udaseg.catalog:_build_fd",
    "mic": "udaseg.catalog:_build_mic",
    "ciss": "udaseg.catalog:_build_ciss",
}


def config_from_dict(cls, settings: dict, where: str):
    """Instantiate the dataclass ``cls`` from ``settings``; unknown keys are a clear error."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        from .errors import ConfigError

        raise ConfigError(
            f"{where}: unknown setting(s) {unknown}; {cls.__name__} accepts: {sorted(names)}"
        )
    return cls(**settings)


def _build_fd(settings: dict, student) -> list:
    from .adapt.methods.fd import FDConfig, ImageNetFeatureDistance

    cfg = config_from_dict(FDConfig, settings, "model.methods.fd")
    return [ImageNetFeatureDistance(student, cfg)]


def _build_mic(settings: dict, student) -> list:
    from .adapt.methods.mic import MaskedImageConsistency, MICConfig

    cfg = config_from_dict(MICConfig, settings, "model.methods.mic")
    return [MaskedImageConsistency(cfg)]


def _build_ciss(settings: dict, student) -> list:
    from .adapt.methods.ciss import (
        CISSConfig,
        CISSSourceTerms,
        CISSTargetTerms,
        InvarianceSettings,
        build_ciss_hooks,
    )

    where = "model.methods.ciss"
    settings = dict(settings)
    for key, cls in (("source", CISSSourceTerms), ("target", CISSTargetTerms),
                     ("invariance", InvarianceSettings)):
        if key in settings and not isinstance(settings[key], cls):
            settings[key] = config_from_dict(cls, dict(settings[key] or {}), f"{where}.{key}")
    cfg = config_from_dict(CISSConfig, settings, where)
    # the loop's HRDA detail-crop CE weight, needed to compensate the loop's CE terms exactly
    detail_weight = float(getattr(getattr(student, "cfg", None), "detail_loss_weight", 0.1))
    num_classes = int(getattr(student, "num_classes", 19))
    return build_ciss_hooks(cfg, detail_weight=detail_weight, num_classes=num_classes)


class MethodHooks:
    """The hooks contributed by the configured methods, grouped by extension point."""

    def __init__(self) -> None:
        self.refiners: list = []
        self.mixer = None
        self.aux_losses: list = []

    def add(self, hook) -> None:
        from .adapt.hooks import AuxLoss, LabelRefiner, Mixer

        if isinstance(hook, AuxLoss) and hasattr(hook, "stage"):
            self.aux_losses.append(hook)
        elif isinstance(hook, Mixer) and getattr(hook, "is_mixer", False):
            if self.mixer is not None:
                raise ValueError("two configured methods both replace the mixer; keep one")
            self.mixer = hook
        elif isinstance(hook, LabelRefiner):
            self.refiners.append(hook)
        else:
            raise TypeError(f"{hook!r} implements no udaseg.adapt.hooks protocol")


def build_methods(methods: dict[str, dict], student) -> MethodHooks:
    """Build the hooks of every configured method, in the order given."""
    hooks = MethodHooks()
    for name, settings in methods.items():
        build = resolve(METHODS, name, "method")
        for hook in build(dict(settings or {}), student):
            hooks.add(hook)
    return hooks
