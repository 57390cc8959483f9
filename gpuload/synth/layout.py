"""Hugging Face style model directories: :func:`write_model`.

``config.json``, ``model-0000N-of-0000M.safetensors`` and
``model.safetensors.index.json``, filled with seeded random bytes.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
from bisect import bisect_left
from pathlib import Path

from gpuload.synth.models import ModelSpec, check_dtype, get_spec
from gpuload.synth.rng import random_chunks
from gpuload.synth.sizing import scale_spec
from gpuload.synth.writer import _Entry, _tensor_nbytes, _write_file

# Bump when the bytes or layout write_model produces change (cached_model's key).
FORMAT_VERSION = 1
HF_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")

# Files write_model may replace: its own, and cached_model's stamp (cache._STAMP).
_OURS = re.compile(
    r"config\.json|model\.safetensors\.index\.json|gpuload-synth\.json"
    r"|model-\d{5}-of-\d{5}\.safetensors"
)


def _split(sizes: list[int], num_files: int) -> list[int]:
    """Cut points (tensor indices) splitting ``sizes`` into ``num_files`` runs of
    near-equal bytes, each non-empty, order kept."""
    ends = list(itertools.accumulate(sizes))
    cuts = [0]
    for k in range(1, num_files):
        target = ends[-1] * k / num_files
        j = bisect_left(ends, target)  # the first tensor ending at or after target
        if j > 0 and target - ends[j - 1] <= ends[j] - target:
            j -= 1
        cuts.append(min(max(j + 1, cuts[-1] + 1), len(sizes) - (num_files - k)))
    return [*cuts, len(sizes)]


def write_model(
    dir: str | os.PathLike[str],
    spec_or_preset: str | ModelSpec,
    *,
    dtype: str = "BF16",
    num_files: int | None = None,
    unaligned: bool = False,
    seed: int = 0,
    target_bytes: int | None = None,
    fsync: bool = False,
) -> Path:
    """Write a Hugging Face style model directory of random tensors.

    Parameters
    ----------
    dir
        Directory to create, or one that holds only an earlier synthetic
        model (its files are replaced).
    spec_or_preset
        A :class:`ModelSpec` or a name in :data:`PRESETS`.
    dtype
        Safetensors dtype of every tensor (BF16, F16, F32, F8_E4M3, ...).
    num_files
        Number of ``model-0000N-of-0000M.safetensors`` files; tensors are cut
        in state-dict (layer) order into runs of near-equal bytes. Default:
        as many as transformers' 5 GB ``max_shard_size`` would make.
    unaligned
        Pad every header so the data section starts at 1 mod 8: with the
        even-sized tensors of these models every tensor offset is odd.
    seed
        RNG seed; a tensor's bytes depend only on ``seed`` and its name.
    target_bytes
        Resize the architecture to about this many tensor bytes first
        (:func:`scale_spec`).
    fsync
        ``fsync`` each file before returning (durable, for caches).

    Returns
    -------
    Path
        ``dir``, holding ``config.json``, the ``.safetensors`` files and
        ``model.safetensors.index.json``.

    Notes
    -----
    Memory use stays under 64 MiB (four 16 MiB RNG chunks in flight), whatever
    the model size. Generation runs in a thread beside the writes.
    """
    check_dtype(dtype)
    if target_bytes is not None:
        spec = scale_spec(spec_or_preset, target_bytes, dtype=dtype)
    else:
        spec = get_spec(spec_or_preset)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{seed=} must be an int >= 0")
    tensors = spec.tensors()
    sizes = [_tensor_nbytes(n, dtype, s) for n, s in tensors]
    total = sum(sizes)
    if num_files is None:
        num_files = max(1, -(-total // HF_MAX_SHARD_BYTES))
    if isinstance(num_files, bool) or not isinstance(num_files, int) or num_files < 1:
        raise ValueError(f"{num_files=} must be a positive int")
    if num_files > len(tensors):
        raise ValueError(f"{num_files=} is more than the model's {len(tensors)} tensors")

    root = Path(dir)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a directory")
    # Rewrite an earlier synthetic model in place; refuse to touch anything else.
    old = list(root.iterdir()) if root.exists() else []
    foreign = [p.name for p in old if not (_OURS.fullmatch(p.name) and p.is_file())]
    if foreign:
        raise FileExistsError(
            f"{root}: holds files write_model did not write ({', '.join(foreign[:3])})"
        )
    for p in old:
        p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < total * 1.02:
        raise OSError(f"{root}: model needs {total} bytes, only {free} free")

    cuts = _split(sizes, num_files)
    weight_map: dict[str, str] = {}
    for k in range(num_files):
        fname = f"model-{k + 1:05d}-of-{num_files:05d}.safetensors"
        entries = []
        for i in range(cuts[k], cuts[k + 1]):
            (name, shape), nbytes = tensors[i], sizes[i]
            chunks = functools.partial(random_chunks, seed, name, nbytes)
            entries.append(_Entry(name, dtype, shape, nbytes, chunks))
            weight_map[name] = fname
        _write_file(
            root / fname, entries, {"format": "pt"}, 8, 0, unaligned, threaded=True, fsync=fsync
        )

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(spec.config(dtype), indent=2) + "\n")
    return root
