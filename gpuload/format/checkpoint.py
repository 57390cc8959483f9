"""A checkpoint: its files' headers, index.json and config.json.

A checkpoint is one ``.safetensors`` file, a list of them, or a model
directory; :func:`open_local` finds its files (through
``model.safetensors.index.json`` when there is one), parses each header
(:mod:`gpuload.format.header`) and :func:`assemble` cross-checks them
against the index's ``weight_map`` into one :class:`Checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpuload.errors import ConfigFileError, HeaderError, IndexFileError
from gpuload.format.gcpause import paused
from gpuload.format.header import FileHeader, TensorInfo, _reject_constant, parse_header

INDEX_NAME = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Every file of a checkpoint, its tensors, and config.json (or {})."""

    root: str | None
    files: tuple[FileHeader, ...]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any]
    config_path: str | None = None  # where ``config`` came from (None: no config.json)
    # A remote checkpoint's store (gpuload.read.remote.source.Source): it makes
    # the reader. None: local files.
    source: Any = dataclasses.field(default=None, repr=False, compare=False)

    def file_bytes(self) -> int:
        return sum(f.size for f in self.files)


# --------------------------------------------------------------------------
# several files, index.json, config.json


def _no_duplicates(file: str, err: type[HeaderError]):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise err(file, "duplicate key in JSON", tensor=k)
            out[k] = v
        return out

    return hook


def _read_json(path: Path, err: type[HeaderError]) -> Any:
    try:
        return json.loads(
            path.read_text(encoding="utf-8"),
            object_pairs_hook=_no_duplicates(str(path), err),
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError:
        raise err(str(path), "not UTF-8") from None
    except RecursionError:
        raise err(str(path), "JSON nested too deeply") from None
    except ValueError as e:
        raise err(str(path), f"not valid JSON: {e}") from None


def _plain_file_name(index: Path, tensor: str, name: Any) -> str:
    """weight_map values must name a file inside the model directory."""
    if not isinstance(name, str):
        raise IndexFileError(str(index), f"weight_map value {name!r} is not a string", tensor)
    bad = (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
    )
    if bad:
        raise IndexFileError(
            str(index),
            f"weight_map file {name!r} is not a plain file name in the directory",
            tensor,
        )
    return name


def _from_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    doc = _read_json(index, IndexFileError)
    if not isinstance(doc, dict) or not isinstance(doc.get("weight_map"), dict):
        raise IndexFileError(str(index), "has no weight_map object")
    wm: dict[str, Any] = doc["weight_map"]
    names = {t: _plain_file_name(index, t, f) for t, f in wm.items()}
    files = sorted(set(names.values()))
    paths = []
    for f in files:
        p = index.parent / f
        if not p.is_file():
            who = next(t for t, n in names.items() if n == f)
            raise IndexFileError(str(index), f"references missing file {f!r}", who)
        paths.append(p)
    return paths, names


def _files_in_dir(root: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    index = root / INDEX_NAME
    if index.is_file():
        paths, names = _from_index(index)
        return paths, names, index
    single = root / "model.safetensors"
    if single.is_file():
        return [single], None, None
    # Regular files (or links to them) only: a directory or a FIFO that
    # happens to match the pattern is not a checkpoint file.
    found = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if not found:
        raise FileNotFoundError(f"{root}: no {INDEX_NAME} and no *.safetensors files")
    return found, None, None


@paused()  # many small acyclic objects: see gpuload.format.gcpause
def open_local(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> Checkpoint:
    """Parse a local checkpoint: a ``.safetensors`` file, a list of them, or a
    model directory (with ``model.safetensors.index.json`` and
    ``config.json``), also as a list of one. URLs are opened by
    :func:`gpuload.read.open.open_checkpoint`, which calls this for a path.

    Raises
    ------
    FileNotFoundError
        ``path`` (or a listed file) does not exist.
    HeaderError, IndexFileError
        A header or the index is malformed, or they disagree; the message names
        the file and the tensor.
    """
    weight_map: dict[str, str] | None = None
    index: Path | None = None
    root: Path | None = None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if (
        isinstance(path, Sequence)
        and not isinstance(path, str)
        and len(path) == 1
        and isinstance(path[0], str | bytes | os.PathLike)
        and os.path.isdir(path[0])
    ):
        path = os.fsdecode(path[0])  # [model_dir]: the directory, index.json and all
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if p.is_dir():
            root = p
            paths, weight_map, index = _files_in_dir(p)
        elif p.exists():  # a FIFO or device too: parse_header refuses it by name
            paths = [p]
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    else:
        if not isinstance(path, Sequence) or not all(
            isinstance(x, str | bytes | os.PathLike) for x in path
        ):
            raise TypeError(
                f"path has to be a file or directory path or a list of file paths, got {path!r}"
            )
        paths = [Path(os.fsdecode(x)) for x in path]
        if not paths:
            raise ValueError("path is an empty list of files")
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"{p}: no such file")
            if p.is_dir():
                raise ValueError(
                    f"{p}: is a directory; a list names .safetensors files "
                    "(pass a model directory on its own, not in a list)"
                )

    headers = [parse_header(p) for p in paths]
    config: dict[str, Any] = {}
    cfg_dir = root if root is not None else paths[0].parent
    cfg = cfg_dir / "config.json"
    if cfg.is_file():
        config = _read_json(cfg, ConfigFileError)
    return assemble(
        headers,
        weight_map,
        None if index is None else str(index),
        config,
        str(cfg) if config or cfg.is_file() else None,
        None if root is None else str(root),
        {h.path: Path(h.path).name for h in headers},
    )


def assemble(
    headers: Sequence[FileHeader],
    weight_map: dict[str, str] | None,
    index: str | None,
    config: Any,
    config_path: str | None,
    root: str | None,
    names: dict[str, str],
    source: Any = None,
) -> Checkpoint:
    """A :class:`Checkpoint` from parsed headers, cross-checked against the
    index's ``weight_map`` (``names``: each header's file name as the index
    writes it). Local and remote checkpoints (:mod:`gpuload.read.remote`) share it."""
    tensors: dict[str, TensorInfo] = {}
    for h in headers:
        for name, info in h.tensors.items():
            if name in tensors:
                raise HeaderError(h.path, f"also stored in {tensors[name].file}", name)
            tensors[name] = info
    if weight_map is not None and index is not None:
        for name, fname in weight_map.items():
            info = tensors.get(name)
            if info is None:
                raise IndexFileError(index, f"listed in {fname!r} but found in no file", name)
            if names[info.file] != fname:
                raise IndexFileError(index, f"listed in {fname!r} but stored in {info.file}", name)
        for name, info in tensors.items():
            if name not in weight_map:
                raise IndexFileError(index, f"stored in {info.file} but not in weight_map", name)
    if config_path is not None and not isinstance(config, dict):
        raise ConfigFileError(config_path, "config.json is not a JSON object")
    config = config or {}
    return Checkpoint(
        root, tuple(headers), tensors, config, config_path if config else None, source
    )
