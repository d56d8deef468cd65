"""Generic parsing of YAML setting blocks into (nested) dataclasses; a leaf module.

Method modules, the engine and the catalog use :func:`config_from_dict`, so that a method's
config block (with nested blocks such as CISS's ``source`` / ``target``) needs no parsing code.
"""

from __future__ import annotations


def config_from_dict(cls, settings, where: str):
    """Instantiate the dataclass ``cls`` from ``settings``, recursively: a field whose type is a
    dataclass (or ``Optional`` of one) and whose value is a dict is built the same way, named
    ``where.field`` in errors. Unknown keys are a clear error. An instance of ``cls`` passes."""
    import dataclasses
    import typing

    if isinstance(settings, cls):
        return settings
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        from .errors import ConfigError

        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} settings, got {settings!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        from .errors import ConfigError

        raise ConfigError(
            f"{where}: unknown setting(s) {unknown}; {cls.__name__} accepts: {sorted(fields)}"
        )
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # unresolvable annotations: no nesting
        hints = {}
    values = dict(settings)
    for name, value in settings.items():
        if not isinstance(value, dict):
            continue
        hint = hints.get(name)
        candidates = [hint, *typing.get_args(hint)] if hint is not None else []
        for c in candidates:
            if isinstance(c, type) and dataclasses.is_dataclass(c):
                values[name] = config_from_dict(c, value, f"{where}.{name}")
                break
    return cls(**values)
