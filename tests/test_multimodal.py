"""Multimodal checkpoints: the text model shards with text_config's head
counts, the vision encoder with vision_config's (vLLM's default
mm_encoder_tp_mode="weights", which Gemma 3 cannot leave: its tower splits
even when vision_tp="data" is asked); embeddings, convolutions and Gemma 3's
projector parameter stay whole. More families: tests/test_vllm_parity.py.

The expected shards are written out by hand with numpy, per tensor, not
taken from our selections.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_tensors

import gpuload
from gpuload.errors import ShardingError
from gpuload.sharding.sharder import Sharder

HEADS, KV, HD, HIDDEN = 4, 2, 16, 64  # text
V_HEADS, V_HD, V_HIDDEN = 12, 4, 48  # vision: 12 heads, not the text model's 4
GEMMA3 = {
    "model_type": "gemma3",
    "text_config": {
        "model_type": "gemma3_text",
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "hidden_size": HIDDEN,
    },
    "vision_config": {"model_type": "siglip_vision_model", "num_attention_heads": V_HEADS},
}
T = "language_model.model.layers.0"
V = "vision_tower.vision_model.encoder.layers.0"
# name -> (shape, how a rank's part is cut: rows | cols | kv | whole)
TENSORS = {
    "language_model.model.embed_tokens.weight": ((128, HIDDEN), "rows"),
    f"{T}.self_attn.q_proj.weight": ((HEADS * HD, HIDDEN), "rows"),
    f"{T}.self_attn.k_proj.weight": ((KV * HD, HIDDEN), "kv"),
    f"{T}.self_attn.o_proj.weight": ((HIDDEN, HEADS * HD), "cols"),
    f"{T}.mlp.gate_proj.weight": ((128, HIDDEN), "rows"),
    f"{T}.mlp.down_proj.weight": ((HIDDEN, 128), "cols"),
    f"{T}.input_layernorm.weight": ((HIDDEN,), "whole"),
    f"{V}.self_attn.q_proj.weight": ((V_HEADS * V_HD, V_HIDDEN), "rows"),
    f"{V}.self_attn.q_proj.bias": ((V_HEADS * V_HD,), "rows"),
    f"{V}.self_attn.out_proj.weight": ((V_HIDDEN, V_HEADS * V_HD), "cols"),
    f"{V}.self_attn.out_proj.bias": ((V_HIDDEN,), "whole"),
    f"{V}.mlp.fc1.weight": ((96, V_HIDDEN), "rows"),
    f"{V}.mlp.fc2.weight": ((V_HIDDEN, 96), "cols"),
    "vision_tower.vision_model.embeddings.patch_embedding.weight": ((V_HIDDEN, 3, 2, 2), "whole"),
    "multi_modal_projector.mm_input_projection_weight": ((V_HIDDEN, HIDDEN), "whole"),
}


def expected(a: np.ndarray, how: str, rank: int, world: int) -> np.ndarray:
    if how == "rows":
        return np.split(a, world, axis=0)[rank]
    if how == "cols":
        return np.split(a, world, axis=1)[rank]
    if how == "kv":  # world > kv heads: each kv head on world // KV consecutive ranks
        heads = np.split(a, KV, axis=0)
        return heads[rank // (world // KV)] if world > KV else np.split(a, world)[rank]
    return a


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    rng = np.random.default_rng(3)
    d = tmp_path_factory.mktemp("gemma3")
    arrays = {n: rng.standard_normal(s, np.float32) for n, (s, _) in TENSORS.items()}
    write_tensors(d / "model.safetensors", arrays, dict.fromkeys(arrays, "F32"))
    (d / "config.json").write_text(json.dumps(GEMMA3))
    return d, arrays


@pytest.mark.parametrize("world", [1, 2, 4])
def test_gemma3_text_and_vision_tower_shard_by_their_own_head_counts(gemma3, world):
    path, arrays = gemma3
    for rank in range(world):
        for vision_tp in ("weights", "data"):  # Gemma 3 has no data mode in vLLM
            got, report = gpuload.load_sharded(
                path, rank, world, device="cpu", return_report=True, vision_tp=vision_tp
            )
            assert set(got) == set(arrays) and not report.unknown
            for name, (_, how) in TENSORS.items():
                want = expected(arrays[name], how, rank, world)
                assert got[name].tobytes() == want.tobytes(), (name, rank, world)


def test_vision_heads_that_do_not_divide_the_world_raise():
    # vLLM siglip.py SiglipAttention: divide(num_heads, tp_size). 12 vision
    # heads over 8 ranks fail even though 48 rows would split evenly.
    s = Sharder(GEMMA3)
    with pytest.raises(ShardingError, match=r"q_proj.*12 heads do not divide by world size 8"):
        s.select(f"{V}.self_attn.q_proj.weight", (V_HEADS * V_HD, V_HIDDEN), 0, 8)
    assert s.select(f"{V}.self_attn.q_proj.weight", (V_HEADS * V_HD, V_HIDDEN), 0, 3).dim == 0
    with pytest.raises(ValueError, match="vision_tp"):
        Sharder(GEMMA3, vision_tp="tensor")


def test_top_level_counts_and_types_win_over_text_config():
    config = {"model_type": "llama", "num_attention_heads": 8, "text_config": GEMMA3["text_config"]}
    s = Sharder(config)
    assert s.family == "llama" and s.num_heads == 8 and s.num_kv_heads == KV


def test_flat_vision_language_configs_pick_the_text_family():
    config = {
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vision_config": {"num_heads": 2},
    }
    s = Sharder(config)
    assert s.family == "llama"
    q = s.select("model.layers.0.self_attn.q_proj.weight", (64, 32), 1, 2)
    assert q.ranges == ((32, 32),)
    # vLLM qwen2_5_vl.py Qwen2_5_VisionAttention: a QKVParallelLinear over
    # the vision heads, so each of q | k | v gives rank 1 its second half.
    qkv = s.select("visual.blocks.0.attn.qkv.weight", (96, 32), 1, 2)
    assert qkv.ranges == ((16, 16), (48, 16), (80, 16))
    assert s.select("visual.merger.mlp.0.weight", (32, 128), 1, 2).ranges == ((16, 16),)
    # vision_tp="data" (Qwen2.5-VL supports it): the encoder stays whole.
    data = Sharder(config, vision_tp="data")
    assert data.select("visual.blocks.0.attn.qkv.weight", (96, 32), 1, 2).dim is None
    assert data.select("visual.merger.mlp.0.weight", (32, 128), 1, 2).dim is None
