"""Quantization scales follow their weight's shard (gpuload.sharding.scales).

The end-to-end oracle does not use our selections: a rank dequantizes its
own FP8 weight shard with its own scale shard, and that must equal, bit for
bit, the rank's shard of the globally dequantized weight, which we load
from a second checkpoint holding the float32 product under the same names.
Any scale a rank got that does not belong to its weight elements shows.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from conftest import write_tensors

import gpuload
from gpuload.errors import ShardingError
from gpuload.sharding import Sharder, Split
from gpuload.sharding.scales import follow, weight_of
from gpuload.sharding.selection import Selection

H, INTER, E = 512, 1024, 4  # hidden, intermediate, experts
HEADS, KV_HEADS = 4, 2  # head_dim 128
BLOCK = 128
CONFIG = {
    "model_type": "qwen3_moe",
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "num_experts": E,
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]},
}
P = "model.layers.0"
# name -> (weight shape, scale suffix, scale kind): "block" [ceil(o/B), ceil(i/B)]
# per 2-D slice, "channel" [o, 1], "channel1d" [o], "tensor" [].
LAYOUT = {
    f"{P}.self_attn.q_proj.weight": ((HEADS * 128, H), "_scale_inv", "block"),
    f"{P}.self_attn.k_proj.weight": ((KV_HEADS * 128, H), "_scale_inv", "block"),
    f"{P}.self_attn.v_proj.weight": ((KV_HEADS * 128, H), "_scale_inv", "block"),
    f"{P}.self_attn.o_proj.weight": ((H, HEADS * 128), "_scale_inv", "block"),
    f"{P}.mlp.shared_expert.gate_proj.weight": ((INTER, H), "_scale", "channel"),
    f"{P}.mlp.shared_expert.up_proj.weight": ((INTER, H), "_scale", "channel1d"),
    f"{P}.mlp.shared_expert.down_proj.weight": ((H, INTER), "_scale", "channel"),
    f"{P}.mlp.experts.w13_weight": ((E, 2 * INTER, H), "_scale_inv", "block"),
    f"{P}.mlp.experts.w2_weight": ((E, H, INTER), "_scale_inv", "block"),
    f"{P}.mlp.experts.0.down_proj.weight": ((H, INTER), "_scale", "tensor"),
}


def scale_shape(shape, kind):
    if kind == "block":
        return (*shape[:-2], -(-shape[-2] // BLOCK), -(-shape[-1] // BLOCK))
    return {"channel": (*shape[:-1], 1), "channel1d": shape[:-1], "tensor": ()}[kind]


def expand(scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Scales broadcast over the weight's elements: blocks of BLOCK, channels, or one."""
    s = scale.reshape((1,) * len(shape)) if scale.ndim == 0 else scale
    s = s.reshape(s.shape + (1,)) if s.ndim == len(shape) - 1 else s  # per channel [o]
    for d, n in enumerate(shape):
        if s.shape[d] not in (1, n):
            s = np.repeat(s, BLOCK, axis=d)[(slice(None),) * d + (slice(0, n),)]
    return np.broadcast_to(s, shape)


def dequant(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.asarray(w, np.float32) * expand(np.asarray(s, np.float32), w.shape)


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory):
    """An FP8 checkpoint and, beside it, the same names holding weight * scale."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("fp8")
    quant, exact = root / "quant", root / "exact"
    tensors, dtypes, products = {}, {}, {}
    for name, (shape, suffix, kind) in LAYOUT.items():
        w = rng.standard_normal(shape, np.float32).astype(ml_dtypes.float8_e4m3fn)
        s = rng.uniform(0.5, 2.0, scale_shape(shape, kind)).astype(np.float32)
        tensors[name], dtypes[name] = w, "F8_E4M3"
        tensors[name + suffix], dtypes[name + suffix] = s, "F32"
        products[name] = dequant(w, s)
    tensors["model.norm.weight"] = np.ones(H, np.float32)
    dtypes["model.norm.weight"] = "F32"
    tensors[f"{P}.self_attn.q_proj.input_scale"] = np.float32(1.5).reshape(())
    dtypes[f"{P}.self_attn.q_proj.input_scale"] = "F32"
    for d, ts, dt in ((quant, tensors, dtypes), (exact, products, dict.fromkeys(products, "F32"))):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(CONFIG))
        write_tensors(d / "model.safetensors", ts, dt)
    return quant, exact


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp", "ep"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_dequantizes_to_its_shard_of_the_exact_weight(fp8_model, world, expert_parallel):
    quant, exact = fp8_model
    for rank in range(world):
        kw = dict(device="cpu", expert_parallel=expert_parallel)
        got = gpuload.load_sharded(quant, rank, world, **kw)
        want = gpuload.load_sharded(exact, rank, world, **kw)
        weights = [n for n in got if n in LAYOUT]
        assert sorted(weights) == sorted(want)  # experts of other ranks: gone, scales too
        for name in weights:
            scale = got.pop(name + LAYOUT[name][1])
            assert dequant(got[name], scale).tobytes() == want[name].tobytes(), (name, rank)
        leftovers = {n for n in got if n not in LAYOUT}
        assert leftovers == {"model.norm.weight", f"{P}.self_attn.q_proj.input_scale"}


def test_scales_are_reported_as_following_their_weight(fp8_model):
    quant, _ = fp8_model
    lp = gpuload.Loader(device="cpu").plan(quant, 1, 2)
    assert not lp.unknown  # no scale is left replicated as unknown
    by_name = {t.name: t for t in lp.plan.tensors}
    q = by_name[f"{P}.self_attn.q_proj.weight_scale_inv"]
    assert q.selection.rule.startswith(f"scale of {P}.self_attn.q_proj.weight")
    assert q.selection.ranges == ((2, 2),)  # blocks 2 and 3 of 4: rank 1's rows 256..511
    down = by_name[f"{P}.mlp.shared_expert.down_proj.weight_scale"]
    assert down.selection.dim is None  # row parallel: every output channel's scale


def sharder(**kw):
    shapes = {n: s for n, (s, _, _) in LAYOUT.items()}
    shapes.update(kw.pop("shapes", {}))
    return Sharder(kw.pop("config", CONFIG), shapes=shapes, **kw)


def test_block_boundaries_that_cut_a_block_are_refused():
    # world 8 gives each rank 64 of o_proj's 512 columns: half a 128-column block.
    name = f"{P}.self_attn.o_proj.weight_scale_inv"
    with pytest.raises(ShardingError, match="cut through quantization blocks of 128"):
        sharder().select(name, (4, 4), 0, 8)


def test_a_block_size_the_shapes_leave_open_needs_it_said():
    # 300 rows in 3 blocks: any block from 100 to 149 fits, and at world 3
    # rank 1 (rows 100..199) would get block 1 under blocks of 100, but its
    # rows straddle blocks 0 and 1 under blocks of 128.
    shapes, rules = {"x.weight": (300, 8)}, {r"^x\.weight$": Split(0)}
    s = Sharder({}, rules, shapes=shapes)
    with pytest.raises(ShardingError, match="fit block sizes 100 to 149"):
        s.select("x.weight_scale_inv", (3, 1), 1, 3)
    assert s.select("x.weight_scale_inv", (3, 1), 0, 1).ranges == ((0, 3),)  # no doubt
    s = Sharder({}, rules, shapes=shapes, weight_block_size=(100, 8))
    assert s.select("x.weight_scale_inv", (3, 1), 1, 3).ranges == ((1, 1),)
    config = {"quantization_config": {"weight_block_size": [128, 128]}}
    s = Sharder(config, rules, shapes=shapes)
    with pytest.raises(ShardingError, match="cut through quantization blocks of 128"):
        s.select("x.weight_scale_inv", (3, 1), 1, 3)
    with pytest.raises(ShardingError, match="do not match block size 128"):
        s.select("x.weight_scale_inv", (2, 1), 1, 3)
    with pytest.raises(ValueError, match="two positive ints"):
        Sharder({}, shapes=shapes, weight_block_size=(0, 8))
    with pytest.raises(ShardingError, match="config.json quantization_config.weight_block_size"):
        Sharder({"quantization_config": {"weight_block_size": [128, True]}}, shapes=shapes)


def test_nvfp4_group_scales_follow_a_packed_weight():
    # NVFP4: [out, in/2] packed bytes, [out, in/16] FP8 group scales (8 bytes a group).
    shapes = {"l.down_proj.weight": (64, 512)}
    s = Sharder({}, {r"down_proj\.weight$": Split(1)}, shapes=shapes)
    sel = s.select("l.down_proj.weight_scale", (64, 64), 1, 4)
    assert sel == Selection(1, ((16, 16),), (64, 16), "column", sel.rule)
    assert s.select("l.down_proj.weight_scale_2", (), 3, 4).dim is None


def test_unknown_weights_leave_their_scales_unknown_and_odd_shapes_are_refused():
    shapes = {"a.weight": (8, 8), "b.weight": (8, 8)}
    s = Sharder({}, {r"^b\.weight$": 0}, shapes=shapes)
    assert s.select("a.weight_scale", (8, 1), 0, 2).rule is None  # as its weight: unknown
    with pytest.raises(ShardingError, match="cannot tell how a scale"):
        s.select("b.weight_scale", (2, 2, 2), 0, 2)
    with pytest.raises(ShardingError, match="only 8 elements"):
        s.select("b.weight_scale", (16, 1), 0, 2)


def test_weight_of_needs_the_weight_in_the_checkpoint():
    shapes = {"x.weight": (2, 2), "e.w13_weight": (1, 2, 2)}
    assert weight_of("x.weight_scale_inv", shapes) == "x.weight"
    assert weight_of("e.w13_weight_scale", shapes) == "e.w13_weight"
    # A static activation scale goes with its layer's weight (another rank's
    # expert's is not this rank's under expert parallelism), and stays whole.
    assert weight_of("x.input_scale", shapes) == "x.weight"
    assert weight_of("y.input_scale", shapes) is None
    assert weight_of("y.weight_scale", shapes) is None


def test_follow_maps_a_fused_selection_section_by_section():
    # gate_up fused [2I, H], world 2: rank 1 takes rows 512..1023 and 1536..2047.
    sel = Selection(0, ((512, 512), (1536, 512)), (1024, H), "fused", "r")
    got = follow("g.weight_scale_inv", (16, 4), "g.weight", (2048, H), sel, (128, 128))
    assert got.ranges == ((4, 4), (12, 4)) and got.shape == (8, 4)
