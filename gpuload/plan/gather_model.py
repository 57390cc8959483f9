"""Where the GPU gather cost model's constants come from: a JSON or the defaults.

``bench/gather.py --write-model`` measures the constants of
:class:`gpuload.plan.transfer.GatherModel` on a real GPU and writes them to one
small JSON file; every later GPU ``Loader`` picks it up. Setting
``GPULOAD_GATHER_MODEL`` / ``gather_model=``:

* ``auto`` (default): :func:`default_path` when it exists, else the defaults;
* a path: that file, which must exist;
* ``0``: the built-in defaults, whatever files exist.

The file holds ``{"launch_s": 1.2e-05, "h2d_bytes_per_s": 5.1e10, ...}``;
constants it leaves out keep their defaults, keys starting with ``_`` record
where the figures came from (GPU, driver, command) and are not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpuload.errors import GpuloadError
from gpuload.plan.transfer import GatherModel

_cache: dict[tuple[str, int], GatherModel] = {}


def default_path() -> Path:
    """``~/.cache/gpuload/gather-model.json``: per user, beside pip's and torch's caches."""
    return Path("~/.cache/gpuload/gather-model.json").expanduser()


def resolve(setting: str) -> tuple[GatherModel, str]:
    """(model, where its constants came from) for a ``gather_model`` setting."""
    if setting.strip().lower() in ("0", "off", "none", "defaults"):
        return GatherModel(), "built-in defaults (gather_model=0)"
    auto = setting.strip().lower() == "auto"
    path = default_path() if auto else Path(setting).expanduser()
    try:
        stamp = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        if auto:
            return GatherModel(), f"built-in defaults (no {path})"
        raise GpuloadError(f"gather_model={setting!r}: {path} does not exist") from None
    key = (str(path), stamp)
    model = _cache.get(key)
    if model is None:
        try:
            values = json.loads(path.read_text())
            model = GatherModel.from_dict(values, source=str(path))
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise GpuloadError(
                f"gather model file {path} is unreadable ({e}); rewrite it with "
                "`python bench/gather.py --write-model` or set GPULOAD_GATHER_MODEL=0"
            ) from e
        _cache[key] = model
    return model, str(path)


def write(path: Path, model: GatherModel, provenance: dict[str, str]) -> None:
    """Write ``model``'s constants (and ``_``-prefixed provenance) to ``path`` atomically."""
    import dataclasses

    values = dataclasses.asdict(model)
    values.update({f"_{k}": v for k, v in provenance.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
