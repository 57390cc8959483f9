"""Sharding rules: which part of each tensor a rank owns, checked with numpy.

The oracle: build ``np.arange(numel).reshape(shape)``, cut each rank's shard
as its Selection says, put every shard back where its ranges say it came
from, and require the original back, every element covered as often as the
split promises (once, or once per kv-head replica).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuload import synth
from gpuload.errors import ShardingError
from gpuload.sharding import (
    MODEL_TYPES,
    RULE_TABLES,
    Expert,
    FusedQKV,
    Heads,
    Replicate,
    Sharder,
    Split,
    Vocab,
)
from gpuload.sharding.cuts import expert_block
from gpuload.sharding.selection import Selection


def _index(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * dim + (slice(start, stop),)


def take(arr: np.ndarray, sel: Selection) -> np.ndarray:
    """The rank's shard of ``arr``: its ranges along ``dim``, side by side."""
    if sel.dim is None:
        return arr.copy()
    pieces = [arr[_index(sel.dim, s, s + n)] for s, n in sel.ranges]
    return np.concatenate(pieces, axis=sel.dim) if pieces else np.empty(sel.shape, arr.dtype)


def reassemble(sharder: Sharder, name: str, shape: tuple[int, ...], world: int):
    """Every rank's Selection, and how often each source element was loaded."""
    arr = np.arange(math.prod(shape)).reshape(shape)
    rebuilt = np.full(shape, -1)
    hits = np.zeros(shape, dtype=np.int64)
    sels = []
    for rank in range(world):
        sel = sharder.select(name, shape, rank, world)
        sels.append(sel)
        if sel is None:
            continue
        shard = take(arr, sel)
        assert shard.shape == sel.shape
        if sel.dim is None:
            rebuilt[...] = shard
            hits += 1
            continue
        assert (
            sel.shape[: sel.dim] + sel.shape[sel.dim + 1 :]
            == shape[: sel.dim] + shape[sel.dim + 1 :]
        )
        offset = 0
        for start, length in sel.ranges:
            assert start >= 0 and start + length <= shape[sel.dim]
            rebuilt[_index(sel.dim, start, start + length)] = shard[
                _index(sel.dim, offset, offset + length)
            ]
            hits[_index(sel.dim, start, start + length)] += 1
            offset += length
    assert (rebuilt == arr).all(), f"{name}: shards do not rebuild the tensor"
    return sels, hits


def assert_partition(sharder: Sharder, name: str, shape: tuple[int, ...], world: int):
    """Each element on exactly one rank; returns the selections."""
    sels, hits = reassemble(sharder, name, shape, world)
    assert (hits == 1).all(), f"{name}: elements loaded {np.unique(hits)} times"
    return sels


# --- Llama family (Llama, Mistral, Qwen2, Qwen3, Gemma) --------------------

# 8 heads, 4 kv heads, head_dim 16, hidden 128, intermediate 352, vocab 1024.
LLAMA_CFG = {"num_attention_heads": 8, "num_key_value_heads": 4}
LLAMA_TENSORS = [
    ("model.embed_tokens.weight", (1024, 128), "row"),
    ("model.layers.0.self_attn.q_proj.weight", (128, 128), "row"),
    ("model.layers.0.self_attn.k_proj.weight", (64, 128), "row"),
    ("model.layers.0.self_attn.v_proj.weight", (64, 128), "row"),
    ("model.layers.0.self_attn.q_proj.bias", (128,), "row"),  # Qwen2
    ("model.layers.0.self_attn.k_proj.bias", (64,), "row"),
    ("model.layers.0.self_attn.o_proj.weight", (128, 128), "column"),
    ("model.layers.0.mlp.gate_proj.weight", (352, 128), "row"),
    ("model.layers.0.mlp.up_proj.weight", (352, 128), "row"),
    ("model.layers.0.mlp.down_proj.weight", (128, 352), "column"),
    ("lm_head.weight", (1024, 128), "row"),
]
LLAMA_REPLICATED = [
    ("model.layers.0.input_layernorm.weight", (128,)),
    ("model.layers.0.post_attention_layernorm.weight", (128,)),
    ("model.layers.0.pre_feedforward_layernorm.weight", (128,)),  # Gemma 2
    ("model.layers.0.self_attn.q_norm.weight", (16,)),  # Qwen3
    ("model.layers.0.self_attn.o_proj.bias", (128,)),
    ("model.layers.0.mlp.down_proj.bias", (128,)),
    ("model.norm.weight", (128,)),
]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_llama_family_partitions(model_type, world):
    sharder = Sharder({"model_type": model_type, **LLAMA_CFG})
    assert sharder.family == "llama"
    for name, shape, kind in LLAMA_TENSORS:
        sels = assert_partition(sharder, name, shape, world)
        assert {s.kind for s in sels} == {kind}, name
        assert all(s.rule is not None for s in sels)
    for name, shape in LLAMA_REPLICATED:
        sel = sharder.select(name, shape, world - 1, world)
        assert sel == Selection.whole(shape, "replicated", sel.rule) and sel.rule is not None


def test_llama_exact_ranges():
    sharder = Sharder({"model_type": "llama", **LLAMA_CFG})
    q = sharder.select("model.layers.0.self_attn.q_proj.weight", (128, 128), 1, 4)
    assert (q.dim, q.ranges, q.shape) == (0, ((32, 32),), (32, 128))  # heads 2-3 of 8
    k = sharder.select("model.layers.5.self_attn.k_proj.weight", (64, 128), 3, 4)
    assert k.ranges == ((48, 16),) and k.kind == "row"  # kv head 3 of 4
    o = sharder.select("model.layers.0.self_attn.o_proj.weight", (128, 128), 2, 4)
    assert (o.dim, o.ranges, o.shape) == (1, ((64, 32),), (128, 32))
    down = sharder.select("model.layers.0.mlp.down_proj.weight", (128, 352), 1, 2)
    assert (down.dim, down.ranges) == (1, ((176, 176),))
    assert "q_proj" in q.rule and "o_proj" in o.rule


def test_gqa_world_larger_than_kv_heads_replicates_kv_heads():
    sharder = Sharder(num_heads=8, num_kv_heads=2)
    name, shape = "model.layers.0.self_attn.k_proj.weight", (32, 64)  # head_dim 16
    sels, hits = reassemble(sharder, name, shape, 8)
    assert [s.ranges for s in sels] == [((0, 16),)] * 4 + [((16, 16),)] * 4
    assert {s.kind for s in sels} == {"kv-replicated"}
    assert (hits == 4).all()  # each kv head on 4 ranks
    bias = sharder.select("model.layers.0.self_attn.v_proj.bias", (32,), 5, 8)
    assert bias.ranges == ((16, 16),)
    q = assert_partition(sharder, "model.layers.0.self_attn.q_proj.weight", (128, 64), 8)
    assert [s.ranges for s in q] == [((16 * r, 16),) for r in range(8)]


@pytest.mark.parametrize(
    ("heads", "kv", "world", "tensor", "words"),
    [
        (8, 8, 3, "q_proj", "8 heads do not divide by world size 3"),
        (12, 3, 4, "k_proj", "world size 4 is not a multiple of 3 kv heads"),
        (12, 6, 4, "k_proj", "6 kv heads do not divide by world size 4"),
    ],
)
def test_head_divisibility_errors_not_relaxed_by_allow_uneven(heads, kv, world, tensor, words):
    for uneven in (False, True):
        sharder = Sharder(num_heads=heads, num_kv_heads=kv, allow_uneven=uneven)
        rows = (heads if tensor == "q_proj" else kv) * 16
        with pytest.raises(ShardingError, match=words):
            sharder.select(f"model.layers.0.self_attn.{tensor}.weight", (rows, 64), 0, world)


def test_unknown_head_count_names_the_fix():
    with pytest.raises(ShardingError, match=r"q_proj.*num_heads=.*config\.json"):
        Sharder().select("model.layers.0.self_attn.q_proj.weight", (128, 128), 0, 2)
    # Non-head rules need no config.
    assert Sharder().select("model.layers.0.mlp.up_proj.weight", (8, 4), 1, 2).ranges == ((4, 4),)


def test_head_counts_from_config_and_kwargs():
    assert Sharder({"n_head": 12}).num_heads == 12  # GPT-2
    s = Sharder({"num_attention_heads": 32})
    assert (s.num_heads, s.num_kv_heads) == (32, 32)  # kv defaults to heads
    s = Sharder({"num_attention_heads": 32, "num_key_value_heads": 8}, num_kv_heads=4)
    assert (s.num_heads, s.num_kv_heads) == (32, 4)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        assert Sharder({key: 64}).num_experts == 64
    assert Sharder({"num_local_experts": 8}, num_experts=16).num_experts == 16
    with pytest.raises(ShardingError, match="config.json num_attention_heads=0"):
        Sharder({"num_attention_heads": 0})  # the file's fault: a GpuloadError
    with pytest.raises(ValueError, match="num_heads=0"):
        Sharder(num_heads=0)  # the caller's
    with pytest.raises(ValueError, match="qkv_sections"):
        Sharder(qkv_sections=(4, 2))


# --- Phi-3: fused qkv and gate_up -------------------------------------------

PHI3_CFG = {"model_type": "phi3", "num_attention_heads": 4, "num_key_value_heads": 2}


def test_phi3_fused_qkv_sections():
    sharder = Sharder(PHI3_CFG)  # head_dim 8: q 32 rows, k 16, v 16
    name, shape = "model.layers.0.self_attn.qkv_proj.weight", (64, 32)
    sels = assert_partition(sharder, name, shape, 2)
    assert sels[0].ranges == ((0, 16), (32, 8), (48, 8))
    assert sels[1].ranges == ((16, 16), (40, 8), (56, 8))
    assert sels[1].shape == (32, 32) and sels[1].kind == "fused"
    # world 4 > 2 kv heads: q split in 4, each kv head on 2 ranks.
    sels, hits = reassemble(sharder, name, shape, 4)
    assert sels[3].ranges == ((24, 8), (40, 8), (56, 8))
    assert (hits[:32] == 1).all() and (hits[32:] == 2).all()


def test_fused_qkv_from_qkv_sections_kwarg():
    sharder = Sharder(num_heads=4, num_kv_heads=2, qkv_sections=(32, 16, 16))
    sel = sharder.select("model.layers.0.self_attn.qkv_proj.weight", (64, 32), 1, 2)
    assert sel.ranges == ((16, 16), (40, 8), (56, 8))
    with pytest.raises(ShardingError, match="qkv_sections"):
        sharder.select("model.layers.0.self_attn.qkv_proj.weight", (72, 32), 1, 2)
    custom = Sharder(num_heads=2, num_kv_heads=1, rules={r"\.Wqkv\.weight$": FusedQKV(dim=1)})
    sel = custom.select("layers.0.attn.Wqkv.weight", (8, 16), 1, 2)  # head_dim 4
    assert (sel.dim, sel.ranges) == (1, ((4, 4), (8, 4), (12, 4)))


def test_phi3_gate_up_and_others():
    sharder = Sharder(PHI3_CFG)
    sels = assert_partition(sharder, "model.layers.2.mlp.gate_up_proj.weight", (96, 32), 4)
    assert sels[1].ranges == ((12, 12), (60, 12)) and sels[1].shape == (24, 32)
    assert sels[1].kind == "fused"
    o = sharder.select("model.layers.2.self_attn.o_proj.weight", (32, 32), 1, 2)
    assert o.kind == "column" and o.ranges == ((16, 16),)
    down = sharder.select("model.layers.2.mlp.down_proj.weight", (32, 48), 1, 2)
    assert down.kind == "column" and down.ranges == ((24, 24),)
    assert sharder.select("model.embed_tokens.weight", (32064, 32), 1, 2).ranges == (
        (16032, 16032),
    )


# --- GPT-2 ------------------------------------------------------------------

GPT2_CFG = {"model_type": "gpt2", "n_head": 4}


def test_gpt2_conv1d_layouts():
    sharder = Sharder(GPT2_CFG)  # hidden 64, Conv1D weights [in, out]
    cases = {
        "transformer.h.0.attn.c_attn.weight": ((64, 192), 1, ((0, 16), (64, 16), (128, 16))),
        "transformer.h.0.attn.c_attn.bias": ((192,), 0, ((0, 16), (64, 16), (128, 16))),
        "transformer.h.0.attn.c_proj.weight": ((64, 64), 0, ((0, 16),)),
        "transformer.h.0.mlp.c_fc.weight": ((64, 256), 1, ((0, 64),)),
        "transformer.h.0.mlp.c_fc.bias": ((256,), 0, ((0, 64),)),
        "transformer.h.0.mlp.c_proj.weight": ((256, 64), 0, ((0, 64),)),
    }
    for name, (shape, dim, ranges0) in cases.items():
        sels = assert_partition(sharder, name, shape, 4)
        assert (sels[0].dim, sels[0].ranges) == (dim, ranges0), name
    assert sels[0].kind == "row"
    assert sharder.select("transformer.h.0.attn.c_attn.weight", (64, 192), 0, 4).kind == "fused"
    for name, shape in [
        ("transformer.h.0.attn.c_proj.bias", (64,)),
        ("transformer.h.0.mlp.c_proj.bias", (64,)),
        ("transformer.wpe.weight", (1024, 64)),
        ("transformer.h.0.ln_1.weight", (64,)),
        ("transformer.ln_f.bias", (64,)),
        ("h.0.attn.bias", (1, 1, 1024, 1024)),  # legacy causal mask buffer
    ]:
        sel = sharder.select(name, shape, 3, 4)
        assert sel.dim is None and sel.rule is not None, name


def test_gpt2_vocab_is_padded_as_vllm():
    # 50257 rows do not divide by 2; vLLM pads to 50304 and gives 25152 a rank.
    sharder = Sharder(GPT2_CFG)
    sels = assert_partition(sharder, "wte.weight", (50257, 8), 2)
    assert [s.ranges for s in sels] == [((0, 25152),), ((25152, 25105),)]


# --- Vocab ------------------------------------------------------------------


def test_vocab_padding_and_errors():
    sharder = Sharder()
    sels = assert_partition(sharder, "model.embed_tokens.weight", (1000, 4), 4)
    assert [s.shape[0] for s in sels] == [256, 256, 256, 232]  # padded to 1024
    with pytest.raises(ShardingError) as err:
        sharder.select("lm_head.weight", (1000, 4), 0, 3)
    for word in ("'lm_head.weight'", "dim 0", "1000", "1024", "world size 3"):
        assert word in str(err.value)
    sels = assert_partition(Sharder(allow_uneven=True), "lm_head.weight", (1000, 4), 3)
    assert [s.shape[0] for s in sels] == [342, 342, 316]
    plain = Sharder(rules={"embed": Vocab(pad_to=1)})
    assert plain.select("model.embed_tokens.weight", (1000, 4), 1, 4).ranges == ((250, 250),)


# --- MoE: Mixtral, Qwen-MoE, DeepSeek ----------------------------------------


def test_mixtral_experts_tensor_parallel():
    sharder = Sharder({"model_type": "mixtral", **LLAMA_CFG, "num_local_experts": 8})
    prefix = "model.layers.3.block_sparse_moe"
    for name, shape, kind in [
        (f"{prefix}.experts.7.w1.weight", (96, 32), "row"),
        (f"{prefix}.experts.7.w3.weight", (96, 32), "row"),
        (f"{prefix}.experts.7.w2.weight", (32, 96), "column"),
    ]:
        sels = assert_partition(sharder, name, shape, 4)
        assert {s.kind for s in sels} == {kind}
    w2 = sharder.select(f"{prefix}.experts.7.w2.weight", (32, 96), 1, 4)
    assert (w2.dim, w2.ranges) == (1, ((24, 24),))
    gate = sharder.select(f"{prefix}.gate.weight", (8, 32), 1, 4)
    assert gate.dim is None and "gate" in gate.rule


def test_qwen_moe_tensors():
    cfg = {"model_type": "qwen2_moe", **LLAMA_CFG, "num_experts": 60}
    sharder = Sharder(cfg)
    assert (
        sharder.family == "qwen_moe" and Sharder({"model_type": "qwen3_moe"}).family == "qwen_moe"
    )
    layer = "model.layers.1.mlp"
    expect = {
        f"{layer}.experts.59.gate_proj.weight": ((64, 32), 0),
        f"{layer}.experts.59.up_proj.weight": ((64, 32), 0),
        f"{layer}.experts.59.down_proj.weight": ((32, 64), 1),
        f"{layer}.shared_expert.gate_proj.weight": ((128, 32), 0),
        f"{layer}.shared_expert.up_proj.weight": ((128, 32), 0),
        f"{layer}.shared_expert.down_proj.weight": ((32, 128), 1),
        f"{layer}.gate.weight": ((60, 32), None),
        f"{layer}.shared_expert_gate.weight": ((1, 32), None),
    }
    for name, (shape, dim) in expect.items():
        sels, hits = reassemble(sharder, name, shape, 2)
        assert all(s.dim == dim and s.rule is not None for s in sels), name
        assert (hits == (1 if dim is not None else 2)).all()


def test_deepseek_mla_and_moe():
    cfg = {"model_type": "deepseek_v3", "num_attention_heads": 8, "n_routed_experts": 16}
    sharder = Sharder(cfg)
    assert sharder.family == "deepseek"
    attn, mlp = "model.layers.1.self_attn", "model.layers.1.mlp"
    split = {  # name: (shape, dim, rank-1 ranges at world 4)
        f"{attn}.q_proj.weight": ((8 * 24, 64), 0, ((48, 48),)),  # V2-Lite, no q-lora
        f"{attn}.q_b_proj.weight": ((8 * 24, 32), 0, ((48, 48),)),
        f"{attn}.kv_b_proj.weight": ((8 * 32, 16), 0, ((64, 64),)),
        f"{attn}.o_proj.weight": ((64, 8 * 16), 1, ((32, 32),)),
        f"{mlp}.shared_experts.gate_proj.weight": ((96, 64), 0, ((24, 24),)),
        f"{mlp}.shared_experts.up_proj.weight": ((96, 64), 0, ((24, 24),)),
        f"{mlp}.shared_experts.down_proj.weight": ((64, 96), 1, ((24, 24),)),
        f"{mlp}.experts.15.gate_proj.weight": ((48, 64), 0, ((12, 12),)),
        f"{mlp}.experts.15.down_proj.weight": ((64, 48), 1, ((12, 12),)),
        "model.layers.0.mlp.gate_proj.weight": ((192, 64), 0, ((48, 48),)),  # dense layer
    }
    for name, (shape, dim, ranges) in split.items():
        sels = assert_partition(sharder, name, shape, 4)
        assert (sels[1].dim, sels[1].ranges) == (dim, ranges), name
    for name, shape in [
        (f"{attn}.q_a_proj.weight", (24, 64)),
        (f"{attn}.kv_a_proj_with_mqa.weight", (40, 64)),
        (f"{attn}.q_a_layernorm.weight", (24,)),
        (f"{attn}.kv_a_layernorm.weight", (32,)),
        (f"{mlp}.gate.weight", (16, 64)),
        (f"{mlp}.gate.e_score_correction_bias", (16,)),
    ]:
        sel = sharder.select(name, shape, 1, 4)
        assert sel.dim is None and sel.kind == "replicated" and sel.rule is not None, name


def test_stacked_experts_tensor_parallel():
    sharder = Sharder({"model_type": "qwen3_moe"})  # [E, out, in]
    layer = "model.layers.0.mlp.experts"
    sels = assert_partition(sharder, f"{layer}.gate_up_proj", (4, 2 * 24, 16), 2)
    assert (sels[1].dim, sels[1].ranges, sels[1].shape) == (1, ((12, 12), (36, 12)), (4, 24, 16))
    sels = assert_partition(sharder, f"{layer}.down_proj", (4, 16, 24), 2)
    assert (sels[1].dim, sels[1].ranges) == (2, ((12, 12),))
    sels = assert_partition(Sharder({"model_type": "mixtral"}), f"{layer}.w13_weight", (4, 8, 6), 2)
    assert sels[0].ranges == ((0, 2), (4, 2))
    sels = assert_partition(sharder, f"{layer}.up_proj", (4, 24, 16), 4)
    assert (sels[3].dim, sels[3].ranges) == (1, ((18, 6),))
    with pytest.raises(ShardingError, match=r"\[E, out, in\]"):
        sharder.select(f"{layer}.down_proj", (16, 24), 0, 2)


# --- Expert parallelism -----------------------------------------------------


def test_expert_block_remainder_to_lowest_ranks():
    assert [expert_block(10, r, 4) for r in range(4)] == [(0, 3), (3, 3), (6, 2), (8, 2)]
    assert [expert_block(3, r, 4)[1] for r in range(4)] == [1, 1, 1, 0]
    for experts in range(0, 20):
        for world in range(1, 7):
            blocks = [expert_block(experts, r, world) for r in range(world)]
            assert sum(c for _, c in blocks) == experts
            assert all(a + n == b for (a, n), (b, _) in zip(blocks[:-1], blocks[1:], strict=True))


def test_expert_parallel_per_expert_tensors():
    cfg = {"model_type": "mixtral", **LLAMA_CFG, "num_local_experts": 10}
    sharder = Sharder(cfg, expert_parallel=True)
    owners = {}
    for e in range(10):
        name = f"model.layers.3.block_sparse_moe.experts.{e}.w2.weight"
        sels = [sharder.select(name, (32, 96), r, 4) for r in range(4)]
        owned = [r for r, s in enumerate(sels) if s is not None]
        assert len(owned) == 1
        owners[e] = owned[0]
        sel = sels[owned[0]]
        assert sel == Selection.whole((32, 96), "expert", sel.rule) and "w2" in sel.rule
    assert owners == {0: 0, 1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 2, 7: 2, 8: 3, 9: 3}
    # Everything else keeps its tensor-parallel rule.
    o = sharder.select("model.layers.3.self_attn.o_proj.weight", (128, 128), 1, 4)
    assert (o.kind, o.ranges) == ("column", ((32, 32),))
    gate = sharder.select("model.layers.3.block_sparse_moe.gate.weight", (10, 32), 1, 4)
    assert gate.kind == "replicated"
    qwen = Sharder({"model_type": "qwen2_moe", "num_experts": 4}, expert_parallel=True)
    shared = qwen.select("model.layers.0.mlp.shared_expert.down_proj.weight", (32, 64), 1, 2)
    assert (shared.kind, shared.ranges) == ("column", ((32, 32),))
    assert qwen.select("model.layers.0.mlp.experts.3.up_proj.weight", (64, 32), 0, 2) is None


def test_expert_parallel_stacked_and_errors():
    sharder = Sharder({"model_type": "deepseek_v3"}, expert_parallel=True)
    name = "model.layers.5.mlp.experts.gate_up_proj"
    sels = assert_partition(sharder, name, (10, 8, 4), 4)
    assert [s.ranges for s in sels] == [((0, 3),), ((3, 3),), ((6, 2),), ((8, 2),)]
    assert sels[2].shape == (2, 8, 4) and sels[2].kind == "expert"
    assert sharder.select(name, (3, 8, 4), 3, 4) is None  # fewer experts than ranks
    with pytest.raises(ShardingError, match="num_experts="):
        sharder.select("model.layers.5.mlp.experts.3.down_proj.weight", (8, 4), 0, 4)
    with pytest.raises(ShardingError, match="expert 12"):
        Sharder({"n_routed_experts": 8}, expert_parallel=True).select(
            "model.layers.5.mlp.experts.12.down_proj.weight", (8, 4), 0, 4
        )
    with pytest.raises(ShardingError, match="10 experts, num_experts=16"):
        Sharder(num_experts=16, expert_parallel=True).select(name, (10, 8, 4), 0, 4)


# --- Uneven dimensions ------------------------------------------------------


def test_uneven_error_names_tensor_dim_size_world():
    name = "model.layers.7.self_attn.o_proj.weight"
    with pytest.raises(ShardingError) as err:
        Sharder().select(name, (128, 130), 0, 4)
    message = str(err.value)
    for word in (repr(name), "dim 1", "size 130", "world size 4", "allow_uneven"):
        assert word in message
    with pytest.raises(ShardingError, match="dim 0 section 1 of size 5"):
        Sharder(rules={"fused": Split(0, sections=(4, 5))}).select("x.fused", (9, 2), 0, 2)


def test_allow_uneven_splits_like_torch_chunk():
    sharder = Sharder(allow_uneven=True)
    sels = assert_partition(sharder, "model.layers.7.self_attn.o_proj.weight", (128, 130), 4)
    assert [s.ranges for s in sels] == [((0, 33),), ((33, 33),), ((66, 33),), ((99, 31),)]
    sels = assert_partition(sharder, "model.layers.0.mlp.up_proj.weight", (5, 3), 4)
    assert [s.shape for s in sels] == [(2, 3), (2, 3), (1, 3), (0, 3)]
    assert sels[3].ranges == ()  # an empty share has nothing to read
    with pytest.raises(ShardingError, match="cannot hold sections 2"):
        sharder.select("model.layers.0.mlp.gate_up_proj.weight", (7, 3), 0, 2)


# --- Caller rules -----------------------------------------------------------


def test_dict_rules_override_tables_in_order():
    rules = {
        r"mlp\.down_proj\.weight$": "row",
        r"self_attn\.o_proj": "replicate",
        r"mlp\.": 1,  # would also match down_proj: the first key wins
        r"\.fused_thing$": Split(0, sections=(2, 6)),
    }
    sharder = Sharder({"model_type": "llama"}, rules)
    down = sharder.select("model.layers.0.mlp.down_proj.weight", (8, 16), 1, 2)
    assert (down.dim, down.ranges, down.rule) == (0, ((4, 4),), r"mlp\.down_proj\.weight$")
    o = sharder.select("model.layers.0.self_attn.o_proj.weight", (8, 8), 1, 2)
    assert o.dim is None and o.rule == r"self_attn\.o_proj"
    up = sharder.select("model.layers.0.mlp.up_proj.weight", (8, 16), 1, 2)
    assert (up.dim, up.ranges, up.kind, up.rule) == (1, ((8, 8),), "column", r"mlp\.")
    fused = sharder.select("a.fused_thing", (8, 3), 1, 2)
    assert fused.ranges == ((1, 1), (5, 3)) and fused.kind == "fused"
    embed = sharder.select("model.embed_tokens.weight", (64, 4), 1, 2)  # table still applies
    assert embed.ranges == ((32, 32),)


def test_callable_rules_fall_through_on_none():
    def my_rules(name, shape):
        if name.endswith("o_proj.weight"):
            return "row"
        if name == "extra.table":
            return Replicate()
        return None

    sharder = Sharder({"model_type": "llama"}, my_rules)
    o = sharder.select("model.layers.0.self_attn.o_proj.weight", (8, 8), 1, 2)
    assert (o.dim, o.ranges, o.rule) == (0, ((4, 4),), "callable:my_rules")
    assert sharder.select("extra.table", (3, 3), 1, 2).rule == "callable:my_rules"
    down = sharder.select("model.layers.0.mlp.down_proj.weight", (8, 8), 1, 2)
    assert down.kind == "column" and "down_proj" in down.rule
    bad = Sharder(rules=lambda name, shape: "diagonal")
    with pytest.raises(TypeError, match="diagonal"):
        bad.select("x", (2, 2), 0, 1)


def test_bad_rules_rejected_at_construction():
    with pytest.raises(TypeError, match="sideways"):
        Sharder(rules={"x": "sideways"})
    with pytest.raises(TypeError, match="is not a spec"):
        Sharder(rules={"x": True})
    with pytest.raises(ValueError, match="bad pattern"):
        Sharder(rules={"(": "row"})
    with pytest.raises(TypeError, match="dict or a callable"):
        Sharder(rules=["row"])
    with pytest.raises(ValueError, match="sections"):
        Split(0, sections=0)
    with pytest.raises(ShardingError, match="splits dim 2"):
        Sharder(rules={"x": 2}).select("x", (4, 4), 0, 2)


# --- Unknown tensors, validation, tables -------------------------------------


def test_unknown_tensors_are_replicated_with_rule_none():
    sharder = Sharder({"model_type": "llama"})
    sel = sharder.select("model.layers.0.mystery.weight", (7, 5), 1, 2)
    assert sel == Selection(None, (), (7, 5), "replicated", None)
    assert sharder.select("model.layers.0.mystery.scale", (7,), 1, 2).rule == "1-d"
    assert sharder.select("model.layers.0.mystery.scale", (), 1, 2).rule == "scalar"
    # A GPT-2 name is unknown to the Llama table, but the generic table knows it.
    assert sharder.select("h.0.mlp.c_fc.weight", (4, 8), 0, 2).rule is None
    assert Sharder().select("h.0.mlp.c_fc.weight", (4, 8), 0, 2).ranges == ((0, 4),)


@pytest.mark.parametrize(("rank", "world"), [(0, 0), (-1, 2), (2, 2), (5, 4)])
def test_invalid_rank_world(rank, world):
    with pytest.raises(ValueError, match=rf"rank={rank}, world={world}"):
        Sharder().select("model.norm.weight", (4,), rank, world)


def test_non_int_rank_world():
    with pytest.raises(TypeError, match="ints"):
        Sharder().select("model.norm.weight", (4,), 0.0, 2)
    with pytest.raises(TypeError, match="ints"):
        Sharder().select("model.norm.weight", (4,), 0, True)


def test_model_types_pick_tables_and_generic_is_the_union():
    assert Sharder({"model_type": "gpt2"}).family == "gpt2"
    assert Sharder({"model_type": "phi3"}).family == "phi3"
    assert Sharder({"model_type": "deepseek_v2"}).family == "deepseek"
    assert Sharder({"model_type": "some_new_model"}).family == "generic"
    assert Sharder({}).family == "generic" and Sharder(None).family == "generic"
    assert set(MODEL_TYPES.values()) <= set(RULE_TABLES)
    generic = dict(RULE_TABLES["generic"])
    specs: dict[str, set] = {}
    for table in RULE_TABLES.values():
        for pattern, spec in table:
            specs.setdefault(pattern, set()).add(spec)
            re.compile(pattern)
    for pattern, found in specs.items():
        if len(found) == 1:
            assert generic[pattern] in found, pattern
        else:  # families disagree (transposed or gpt-oss experts): generic has none
            assert pattern not in generic, pattern
    assert r"\.mlp\.experts\.gate_up_proj$" not in generic
    assert isinstance(generic[r"\.self_attn\.qkv_proj\.(weight|bias)$"], FusedQKV)
    assert isinstance(generic[r"\.self_attn\.q_proj\.(weight|bias)$"], Heads)
    assert isinstance(generic[r"\.mlp\.experts\.\d+\.down_proj\.weight$"], Expert)


# --- Property: row / column splits partition the dimension -------------------


@settings(max_examples=150, deadline=None)
@given(
    dims=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    world=st.integers(1, 8),
    column=st.booleans(),
    uneven=st.booleans(),
)
def test_row_column_selections_partition_the_dim(dims, world, column, uneven):
    dim = 1 if column and len(dims) > 1 else 0
    if not uneven:
        dims[dim] *= world  # make it divide
    shape = tuple(dims)
    sharder = Sharder(rules={"t": "column" if dim else "row"}, allow_uneven=uneven)
    sels = [sharder.select("t", shape, r, world) for r in range(world)]
    assert {s.dim for s in sels} == {dim}
    cursor = 0
    for start, length in [r for s in sels for r in s.ranges]:
        assert start == cursor and length > 0  # rank order, back to back, nothing empty
        cursor += length
    assert cursor == shape[dim]
    rest = shape[:dim] + shape[dim + 1 :]
    assert all(s.shape[:dim] + s.shape[dim + 1 :] == rest for s in sels)
    sizes = [s.shape[dim] for s in sels]
    per = -(-shape[dim] // world)
    assert sizes == sorted(sizes, reverse=True) and max(sizes) <= per
    if not uneven:
        assert sizes == [shape[dim] // world] * world


@pytest.mark.parametrize("preset", [p for p in synth.PRESETS if p.startswith("tiny")])
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_remembered_matches_and_splits_equal_fresh_ones(preset, expert_parallel):
    # Sharder remembers built-in matches by name up to its indices and splits
    # by (spec, shape, rank, world): a warm Sharder must answer every tensor
    # as a fresh one does, across layers, experts and ranks.
    spec = synth.get_spec(preset)
    config = spec.config()
    warm = Sharder(config, expert_parallel=expert_parallel)
    for world in (1, 2, 4):
        for rank in range(world):
            for name, shape in spec.tensors():
                fresh = Sharder(config, expert_parallel=expert_parallel)
                assert warm.select(name, shape, rank, world) == fresh.select(
                    name, shape, rank, world
                ), (name, rank, world)


# ---------------------------------------------------------------- issue 23: head counts


def _tiny_with(tmp_path, **config):
    import json

    from gpuload import synth

    path = synth.write_model(tmp_path / "m", "tiny", num_files=1)  # 8 heads, 4 kv, head_dim 8
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(config)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_more_kv_heads_than_heads_refused_from_config(tmp_path):
    import gpuload

    path = _tiny_with(tmp_path, num_key_value_heads=16)
    with pytest.raises(ShardingError) as e:
        gpuload.load_sharded(path, 0, 8, device="cpu")
    msg = str(e.value)
    assert "16 kv heads" in msg and "8 heads" in msg and "exceed" in msg
    assert str(path / "config.json") in msg and "num_key_value_heads" in msg


def test_more_kv_heads_than_heads_refused_from_keyword(tmp_path):
    import gpuload

    path = _tiny_with(tmp_path)
    with pytest.raises(ShardingError, match=r"16 kv heads \(from the keyword num_kv_heads=16\)"):
        gpuload.load_sharded(path, 0, 8, device="cpu", num_kv_heads=16)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_kv_head_count_contradicting_shapes_refused(tmp_path, world):
    """config says 2 kv heads, k_proj holds 4 (head_dim 16 against q's 8):
    refused, naming both tensors and where the counts came from."""
    import gpuload

    path = _tiny_with(tmp_path, num_key_value_heads=2)
    with pytest.raises(ShardingError) as e:
        gpuload.load_sharded(path, 0, world, device="cpu")
    msg = str(e.value)
    assert "head_dim 16" in msg and "head_dim" in msg and "_proj.weight" in msg
    assert "q_proj" in msg and ("k_proj" in msg or "v_proj" in msg)
    assert f"{path / 'config.json'} num_key_value_heads" in msg


@pytest.mark.parametrize(
    "source,kwargs,config",
    [
        ("config", {}, {"num_key_value_heads": 3, "num_attention_heads": 3}),
        ("keyword", {"num_kv_heads": 3, "num_heads": 3}, {}),
    ],
)
def test_head_count_errors_say_where_the_count_came_from(tmp_path, source, kwargs, config):
    import gpuload

    path = _tiny_with(tmp_path, **config)
    with pytest.raises(ShardingError) as e:
        gpuload.load_sharded(path, 0, 1, device="cpu", **kwargs)
    msg = str(e.value)
    assert "is not a multiple of 3" in msg and "_proj.weight" in msg, msg
    if source == "config":
        assert f"came from {path / 'config.json'} num_" in msg, msg
    else:
        assert "came from the keyword num_" in msg, msg


def test_heads_not_dividing_world_names_tensor_and_source(tmp_path):
    import gpuload

    path = _tiny_with(tmp_path)
    with pytest.raises(ShardingError) as e:
        gpuload.load_sharded(path, 0, 16, device="cpu", allow_uneven=True)
    msg = str(e.value)
    assert "q_proj.weight" in msg and "8 heads do not divide by world size 16" in msg
    assert f"came from {path / 'config.json'} num_attention_heads" in msg, msg
