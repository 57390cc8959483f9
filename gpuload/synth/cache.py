"""An on-disk cache of synthetic models: :func:`cached_model`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from gpuload.synth.layout import FORMAT_VERSION, write_model
from gpuload.synth.models import ModelSpec, check_dtype, get_spec
from gpuload.synth.sizing import scale_spec

_STAMP = "gpuload-synth.json"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gpuload" / "synth"


def clear_cache(cache_dir: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """Delete every cached model under ``cache_dir`` (default
    :func:`default_cache_dir`); returns (models removed, bytes freed).

    Only entries this module wrote are touched: folders holding its stamp
    file, and the temporary folders of writers that are no longer running.
    Anything else under the folder stays, so a mistaken ``cache_dir`` cannot
    delete a user's files.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    removed = freed = 0
    if not cache.is_dir():
        return 0, 0
    for entry in sorted(cache.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if entry.name.startswith(".tmp-"):
            pid = entry.name.rsplit("-", 2)[-2]
            if not (pid.isdigit() and not _pid_alive(int(pid))):
                continue  # a writer that may still be running
        elif not (entry / _STAMP).is_file():
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        shutil.rmtree(entry)
        removed, freed = removed + 1, freed + size
    return removed, freed


def _complete(root: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``root`` was written for ``stamp`` and holds every file it lists,
    at the listed sizes."""
    try:
        found = json.loads((root / _STAMP).read_text())
        if {k: found[k] for k in stamp} != stamp:
            return False
        return all((root / f).stat().st_size == n for f, n in found["files"].items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cached_model(
    preset: str | ModelSpec,
    target_bytes: int | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "BF16",
    unaligned: bool = False,
    seed: int = 0,
    num_files: int | None = None,
) -> Path:
    """A model written by :func:`write_model` once, then reused.

    ``cache_dir`` defaults to ``~/.cache/gpuload/synth``. An entry's name
    encodes preset, size, dtype, alignment, seed, file count and
    :data:`FORMAT_VERSION`; its stamp file records the exact spec and every
    file's size. A model is written into a temporary directory, fsynced and
    renamed into place when complete, so an interrupted write is never reused;
    an entry that does not match its stamp is rewritten. ``target_bytes=None``
    keeps the preset's own size.
    """
    check_dtype(dtype)
    spec = (
        get_spec(preset) if target_bytes is None else scale_spec(preset, target_bytes, dtype=dtype)
    )
    if isinstance(preset, str):
        name = preset
    else:
        name = "spec" + hashlib.blake2b(repr(spec).encode(), digest_size=6).hexdigest()
    parts = [name, "full" if target_bytes is None else str(target_bytes), dtype]
    parts += ["unaligned" if unaligned else "aligned", f"seed{seed}"]
    parts += ["files" + ("auto" if num_files is None else str(num_files)), f"v{FORMAT_VERSION}"]
    # The spec goes in the stamp, not the name: a changed scale_spec or a
    # different ModelSpec under the same name rewrites the entry.
    key = "-".join(parts)
    stamp = {"key": key, "spec": dataclasses.asdict(spec)}
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / key
    if _complete(final, stamp):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in cache.glob(f".tmp-{key}-{host}-*"):  # left by killed writers on this host
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{host}-{os.getpid()}-", dir=cache))
    try:
        m = write_model(
            tmp / "m", spec, dtype=dtype, num_files=num_files, unaligned=unaligned,
            seed=seed, fsync=True,
        )  # fmt: skip
        files = {p.name: p.stat().st_size for p in sorted(m.iterdir())}
        (m / _STAMP).write_text(json.dumps({**stamp, "files": files}, indent=1))
        if final.exists():  # stale or incomplete
            shutil.rmtree(final)
        try:
            os.rename(m, final)
        except OSError:
            if not _complete(final, stamp):  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
