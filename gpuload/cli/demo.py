"""``gpuload demo``: the README's "run the main job".

Writes a small synthetic HF-layout checkpoint (Llama-like, GQA, bf16, two
files and an index), loads every rank of the world on the best device
available, checks every byte against safetensors + numpy slicing, checks
that the ranks' shards reassemble each split tensor, and prints the stage
breakdown.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpuload import synth
from gpuload.loader import Loader
from gpuload.sharding.verify import as_bytes, cut, mismatches, reference_tensors


def run_demo(directory: Path, *, device: str | None = None, world: int = 2) -> bool:
    ok = True
    # The Loader first: a device that cannot be used fails before anything is written.
    with Loader(device=device) as loader:
        model = synth.write_model(directory / "tiny-llama", "tiny", num_files=2)
        print(f"wrote {model} (synthetic tiny Llama, bf16, 2 files + index.json)")
        print(f"device: {loader.device}, reader: {loader.backend} ({loader.backend_reason})")
        shards: dict[str, list[np.ndarray]] = {}
        reference = None
        for rank in range(world):
            lp = loader.plan(model, rank, world)
            if reference is None:
                reference = reference_tensors(f.path for f in lp.checkpoint.files)
            tensors, report = loader.load(model, rank, world, return_report=True)
            expected = {t.name: cut(reference[t.name], t.selection) for t in lp.plan.tensors}
            bad = mismatches(tensors, expected)
            status = "all bytes match safetensors + numpy slicing" if not bad else f"MISMATCH {bad}"
            ok &= not bad
            print(f"\nrank {rank}/{world}: {len(tensors)} tensors, {status}")
            print(report.table())
            for t in lp.plan.tensors:
                if t.selection.dim is not None:
                    arr = np.frombuffer(as_bytes(tensors[t.name]), reference[t.name].dtype)
                    shards.setdefault(t.name, []).append(
                        (t.selection, arr.reshape(expected[t.name].shape))
                    )
        # The ranks' shards put back where their selections came from must
        # rebuild the full tensor (every split tensor, every byte).
        rebuilt_bad = []
        for name, parts in shards.items():
            full = np.zeros_like(reference[name])
            seen = np.zeros(full.shape, bool)
            for sel, arr in parts:
                placed = 0
                for start, length in sel.ranges:
                    src = np.take(arr, np.arange(placed, placed + length), axis=sel.dim)
                    idx = [slice(None)] * full.ndim
                    idx[sel.dim] = slice(start, start + length)
                    full[tuple(idx)] = src
                    seen[tuple(idx)] = True
                    placed += length
            if not seen.all() or full.tobytes() != reference[name].tobytes():
                rebuilt_bad.append(name)
        ok &= not rebuilt_bad
        print(
            f"\nreassembly of {len(shards)} split tensors from {world} ranks: "
            + ("exact" if not rebuilt_bad else f"WRONG for {rebuilt_bad}")
        )
    print("demo " + ("passed" if ok else "FAILED"))
    return ok
