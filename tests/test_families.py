"""Real family layouts (synthetic bytes) loaded at every rank of every world.

For each tiny preset the union of all ranks' shards must rebuild every split
tensor (kv heads replicated beyond the kv-head count), and each rank's bytes
must match safetensors + numpy slicing.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpuload
from gpuload import synth
from gpuload.sharding.verify import cut, mismatches, reference_tensors

PRESETS = ["tiny", "tiny-mixtral", "tiny-qwen-moe", "tiny-phi3"]


@pytest.fixture(scope="module", params=PRESETS)
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param) / "m"
    path = synth.write_model(d, request.param, num_files=2, unaligned=request.param == "tiny")
    ck = gpuload.open_checkpoint(path)
    return path, ck, reference_tensors(f.path for f in ck.files)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_rank_exact_and_ranks_rebuild_tensors(model, world):
    path, ck, ref = model
    moe = any(".experts." in n for n in ck.tensors)
    for expert_parallel in (False, True) if moe else (False,):
        check_world(ck, ref, world, expert_parallel)


def check_world(ck, ref, world, expert_parallel):
    covered = {n: np.zeros(a.shape, np.int32) for n, a in ref.items()}
    with gpuload.Loader(device="cpu", chunk_bytes=8192, min_chunk_bytes=1024) as ld:
        for rank in range(world):
            lp = ld.plan(ck, rank, world, expert_parallel=expert_parallel)
            got = ld.load(ck, rank, world, expert_parallel=expert_parallel)
            want = {t.name: cut(ref[t.name], t.selection) for t in lp.plan.tensors}
            assert not mismatches(got, want)
            assert not lp.unknown, f"{lp.unknown} matched no rule"
            for t in lp.plan.tensors:
                sel = t.selection
                if sel.dim is None:
                    covered[t.name] += 1
                    continue
                for start, n in sel.ranges:
                    idx = [slice(None)] * len(sel.shape)
                    idx[sel.dim] = slice(start, start + n)
                    covered[t.name][tuple(idx)] += 1
    for name, c in covered.items():
        # Every element is loaded by some rank; experts exactly once under EP.
        assert c.min() >= 1, f"{name}: elements no rank loaded"
        if expert_parallel and ".experts." in name:
            assert c.max() == 1, name


def test_gqa_world_beyond_kv_heads_replicates_kv(tmp_path):
    path = synth.write_model(tmp_path / "m", "tiny")  # 8 heads, 4 kv heads
    ck = gpuload.open_checkpoint(path)
    name = "model.layers.0.self_attn.k_proj.weight"
    shards = [gpuload.load_sharded(ck, r, 8, device="cpu", include=[name])[name] for r in range(8)]
    head = ck.tensors[name].shape[0] // 4
    assert all(s.shape[0] == head for s in shards)
    for r in range(0, 8, 2):  # ranks 2h and 2h+1 hold kv head h
        assert shards[r].tobytes() == shards[r + 1].tobytes()
    assert len({s.tobytes() for s in shards}) == 4
