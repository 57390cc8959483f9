"""vLLM 0.33.0 parity beyond the basic families, at worlds 2, 4 and 8, every rank.

Each checkpoint is tiny and random; where transformers can build the model
it writes it (so names and shapes are the real ones), otherwise the tensors
are written by hand with the real names and shapes. The expected shard of
every tensor is numpy slicing written here from vLLM's rule (the file and
function are cited beside each), never gpuload's own selection code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
from conftest import write_tensors

import gpuload
from gpuload.errors import ShardingError

WORLDS = (2, 4, 8)


def rows(a: np.ndarray, rank: int, world: int, axis: int = 0) -> np.ndarray:
    """vLLM's even split (ColumnParallelLinear / RowParallelLinear narrow)."""
    n = a.shape[axis] // world
    assert n * world == a.shape[axis]
    return np.take(a, range(rank * n, (rank + 1) * n), axis=axis)


def sections(a: np.ndarray, sizes, rank: int, world: int, axis: int) -> np.ndarray:
    """Each fused section split on its own, the rank's parts side by side
    (vLLM MergedColumnParallelLinear / QKVParallelLinear weight_loader)."""
    parts, off = [], 0
    for size in sizes:
        parts.append(rows(np.take(a, range(off, off + size), axis=axis), rank, world, axis))
        off += size
    return np.concatenate(parts, axis=axis)


def kv_heads(a: np.ndarray, kv: int, rank: int, world: int) -> np.ndarray:
    """vLLM QKVParallelLinear: kv heads replicated on world // kv ranks."""
    if world <= kv:
        return rows(a, rank, world)
    return np.split(a, kv)[rank // (world // kv)]


def vocab(a: np.ndarray, rank: int, world: int) -> np.ndarray:
    """VocabParallelEmbedding: padded to 64 rows, padded // world a rank."""
    per = -(-a.shape[0] // 64) * 64 // world
    return a[rank * per : (rank + 1) * per]


def save(model, path) -> dict[str, np.ndarray]:
    model.save_pretrained(path)
    return safetensors.numpy.load_file(path / "model.safetensors")


def check(path, arrays, expected, world, **kwargs) -> None:
    """Every rank of ``world`` gets exactly ``expected(name, array, rank)``
    for every tensor (None: the rank holds no part of it)."""
    for rank in range(world):
        got = gpuload.load_sharded(path, rank, world, device="cpu", **kwargs)
        want = {
            n: w for n, a in arrays.items() if (w := expected(n, a, rank, world)) is not None
        }
        assert set(got) == set(want), (rank, world, set(got) ^ set(want))
        for name, w in want.items():
            assert got[name].shape == w.shape, (name, rank, world)
            assert got[name].tobytes() == np.ascontiguousarray(w).tobytes(), (name, rank, world)


# --- 1. GPT-2: heads must divide the world ---------------------------------
# vLLM gpt2.py GPT2Attention.__init__ asserts total_num_heads % tp == 0; c_attn
# is a QKVParallelLinear (Conv1D [in, 3 * n_embd], transposed by
# GPT2LMHeadModel.load_weights), c_fc column-, c_proj row-parallel.


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=48, n_head=12, n_layer=1, n_positions=16, vocab_size=128)
    path = tmp_path_factory.mktemp("gpt2")
    return path, save(transformers.GPT2LMHeadModel(cfg), path)


def gpt2_expected(name, a, rank, world):
    h = 48
    if name.endswith("c_attn.weight"):
        return sections(a, (h, h, h), rank, world, axis=1)
    if name.endswith("c_attn.bias"):
        return sections(a, (h, h, h), rank, world, axis=0)
    if name.endswith(("c_fc.weight", "c_fc.bias")):
        return rows(a, rank, world, axis=a.ndim - 1)
    if name.endswith("c_proj.weight"):
        return rows(a, rank, world, axis=0)
    if name.endswith("wte.weight"):
        return vocab(a, rank, world)
    return a  # wpe, layer norms, c_proj biases


@pytest.mark.parametrize("world", [2, 4])
def test_gpt2_heads_split_whole(gpt2, world):
    path, arrays = gpt2
    check(path, arrays, gpt2_expected, world)


def test_gpt2_heads_not_divisible_by_the_world_raise(gpt2):
    path, _ = gpt2  # 12 heads over 8 ranks: vLLM asserts, so do we
    for rank in range(8):
        with pytest.raises(ShardingError, match="c_attn.*12 heads do not divide by world size 8"):
            gpuload.load_sharded(path, rank, 8, device="cpu")
