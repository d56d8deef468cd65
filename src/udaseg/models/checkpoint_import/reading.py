"""Reading checkpoint files (safetensors, ``torch.load(weights_only=True)``, and the opt-in unsafe
path with placeholders for classes that are not installed)."""

from __future__ import annotations

import os
import pickle
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ...errors import CheckpointError


# --------------------------------------------------------------------------------------- reading
@dataclass
class RawCheckpoint:
    """A checkpoint file as read: the flat tensor dict plus what surrounded it.

    Attributes:
        path: the file.
        tensors: ``{name: tensor}`` of the state dict (unwrapped from ``state_dict``/``model``).
        top_keys: the non-state-dict entries of the top-level container (``meta``,
            ``optimizer``, ``hyper_parameters``, ``pytorch-lightning_version`` ...).
        metadata: the ``.safetensors`` header metadata (empty for pickled files).
        unsafe: True when the file was loaded with ``weights_only=False``.
        placeholders: globals that were missing on unsafe loading and replaced by placeholders.
        skipped: names of non-tensor entries inside the state dict (ignored).
    """

    path: str
    tensors: dict[str, Tensor]
    top_keys: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    unsafe: bool = False
    placeholders: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class _Placeholder:
    """Stands in for a class or function whose module is not installed (unsafe loading only).

    Accepts any construction protocol of pickle (call, ``__new__``, ``__setstate__``, item and
    list appends) and keeps what it got, so containers holding such objects still load.
    """

    _qualname = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.__dict__["_args"] = args
        self.__dict__["_kwargs"] = kwargs

    def __setstate__(self, state) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key, value) -> None:
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value) -> None:
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values) -> None:
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<placeholder for {self._qualname}>"


def _lenient_pickle_module(missing: list[str]) -> types.ModuleType:
    """A ``pickle``-like module whose Unpickler replaces unimportable globals by placeholders."""

    class LenientUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                qual = f"{module}.{name}"
                if qual not in missing:
                    missing.append(qual)
                return type(name, (_Placeholder,), {"_qualname": qual})

    mod = types.ModuleType("udaseg_lenient_pickle")
    mod.Unpickler = LenientUnpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: LenientUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return mod


def _unsafe_globals(path: Path) -> list[str]:
    fn = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if fn is None:
        return []
    try:
        return list(fn(str(path)))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files are not supported by the scan
        return []


_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_torch_file(path: Path) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a legacy pickle that starts with
    torch's magic number."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(64)
    return _LEGACY_MAGIC in head


def read_checkpoint(path: str | os.PathLike[str], allow_unsafe: bool = False) -> RawCheckpoint:
    """Read a checkpoint file without interpreting its keys.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``. If that refuses the file because it
    pickles Python objects other than tensors, a :class:`CheckpointError` names them and explains
    ``--allow-unsafe``; with ``allow_unsafe=True`` the file is then loaded with
    ``weights_only=False`` (this executes code pickled in the file: only for trusted files).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable file, pickled objects without ``allow_unsafe``, or no tensors.
    """
    from ..weights import read_safetensors, require_weights_file

    p = require_weights_file(path)
    if p.suffix == ".safetensors":
        tensors, metadata = read_safetensors(p)
        return RawCheckpoint(str(p), tensors, metadata=metadata)

    unsafe, placeholders = False, []
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _is_torch_file(p):
            raise CheckpointError(
                f"{str(p)!r}: not a PyTorch checkpoint (neither a torch zip archive nor a legacy "
                "torch.save file); it is corrupt or of another type"
            ) from e
        globs = _unsafe_globals(p)
        what = (
            f"Python objects other than tensors ({', '.join(globs[:8])}"
            f"{', ...' if len(globs) > 8 else ''})"
            if globs
            else "Python objects other than tensors"
        )
        if not allow_unsafe:
            raise CheckpointError(
                f"{str(p)!r} pickles {what}, so torch.load(weights_only=True) refuses it. This is "
                "normal for legacy checkpoints of the seed repositories (mmcv meta, Lightning-1.x "
                "hyper-parameters). If you trust the file's source, re-run with --allow-unsafe "
                "(convert_checkpoint(..., allow_unsafe=True)): it loads the file with "
                "weights_only=False, which EXECUTES code pickled in the file. The converted "
                ".safetensors file then holds tensors only."
            ) from None
        missing: list[str] = []
        try:
            obj = torch.load(
                p,
                map_location="cpu",
                weights_only=False,
                pickle_module=_lenient_pickle_module(missing),
            )
        except Exception as e2:
            raise CheckpointError(
                f"{str(p)!r}: could not be read even with weights_only=False: {e2}"
            ) from e2
        unsafe, placeholders = True, missing
    except Exception as e:  # corrupt archive, wrong file type, ...
        raise CheckpointError(
            f"{str(p)!r}: torch.load(weights_only=True) could not read this file: {e}. It is "
            "corrupt or not a PyTorch checkpoint."
        ) from e

    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{str(p)!r}: expected a checkpoint dict, the file holds a {type(obj).__name__}"
        )
    top_keys: list[str] = []
    sd: Mapping = obj
    for container in ("state_dict", "model"):
        inner = obj.get(container)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            sd = inner
            top_keys = [str(k) for k in obj if k != container]
            break
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, Tensor)}
    skipped = [str(k) for k, v in sd.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{str(p)!r}: no tensors found (top-level keys: {keys})")
    return RawCheckpoint(str(p), tensors, top_keys, {}, unsafe, placeholders, skipped)

