"""vLLM 0.33.0 parity beyond the basic families, at worlds 2, 4 and 8, every rank.

Each checkpoint is tiny and random; where transformers can build the model
it writes it (so names and shapes are the real ones), otherwise the tensors
are written by hand with the real names and shapes. The expected shard of
every tensor is numpy slicing written here from vLLM's rule (the file and
function are cited beside each), never gpuload's own selection code.
"""

from __future__ import annotations

import json
import re

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


def kv_heads(a: np.ndarray, kv: int, rank: int, world: int, axis: int = 0) -> np.ndarray:
    """vLLM QKVParallelLinear: kv heads replicated on world // kv ranks."""
    if world <= kv:
        return rows(a, rank, world, axis)
    return np.split(a, kv, axis=axis)[rank // (world // kv)]


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
        want = {n: w for n, a in arrays.items() if (w := expected(n, a, rank, world)) is not None}
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


# --- 6. Transposed stacked experts: Llama 4, Qwen3-VL-MoE --------------------
# gate_up_proj [E, H, 2I] and down_proj [E, I, H]. vLLM llama4.py
# Llama4Model.load_moe_expert_weights transposes (-1, -2) and chunks gate | up
# on the output dim; fused_moe/routed_experts.py _orient_fused_weight does the
# same for Qwen3-VL-MoE (is_fused_checkpoint_transposed=True in
# qwen3_vl_moe.py Qwen3VLMoeDecoderLayer). FusedMoE._load_w13 / _load_w2 then
# narrow the intermediate dim by tp rank; under expert parallelism a rank
# holds a dim-0 block of E / world experts (FusedMoE expert_map, linear).
H, INTER, E = 64, 48, 8  # H != I != 2I: the two layouts cannot be confused


def transposed_experts(name, a, rank, world, expert_parallel):
    if expert_parallel:
        return rows(a, rank, world, axis=0)
    if name.endswith("experts.gate_up_proj"):  # [E, H, 2I]: gate | up on dim 2
        return sections(a, (INTER, INTER), rank, world, axis=2)
    return rows(a, rank, world, axis=1)  # down_proj [E, I, H]


def llama_text(name, a, rank, world, kv=2):
    """Llama-style attention and MLP rows/columns, vocab-padded embeddings."""
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return vocab(a, rank, world)
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return rows(a, rank, world)
    if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
        return kv_heads(a, kv, rank, world)
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return rows(a, rank, world)
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return rows(a, rank, world, axis=1)
    assert a.ndim == 1 or name.endswith(("router.weight", "gate.weight")), name
    return a  # norms, routers


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    text = dict(
        hidden_size=H,
        intermediate_size=INTER,
        intermediate_size_mlp=32,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        num_local_experts=E,
        interleave_moe_layer_step=2,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=8,
        image_size=28,
        patch_size=14,
        vision_output_dim=32,
        projector_input_dim=32,
        projector_output_dim=32,
    )
    cfg = transformers.Llama4Config(text_config=text, vision_config=vision)
    path = tmp_path_factory.mktemp("llama4")
    arrays = save(transformers.Llama4ForConditionalGeneration(cfg), path)
    assert arrays["language_model.model.layers.1.feed_forward.experts.gate_up_proj"].shape == (
        E,
        H,
        2 * INTER,
    )
    return path, arrays


def llama4_text(expert_parallel):
    def expected(name, a, rank, world):
        if not name.startswith("language_model."):
            return None  # vision: see the vision-tower tests
        if ".feed_forward.experts." in name:
            return transposed_experts(name, a, rank, world, expert_parallel)
        return llama_text(name, a, rank, world)  # shared_expert: a LlamaMLP, split under EP too

    return expected


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_llama4_transposed_experts_and_shared_expert(llama4, world, expert_parallel):
    path, arrays = llama4
    check(
        path,
        arrays,
        llama4_text(expert_parallel),
        world,
        include=r"^language_model\.",
        expert_parallel=expert_parallel,
    )


@pytest.fixture(scope="module")
def qwen3_vl_moe(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    text = dict(
        hidden_size=H,
        intermediate_size=64,
        moe_intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        num_experts=E,
        num_experts_per_tok=2,
        rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]},
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        depth=1,
        num_heads=8,
        out_hidden_size=H,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=2,
        deepstack_visual_indexes=[0],
    )
    cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    path = tmp_path_factory.mktemp("qwen3_vl_moe")
    arrays = save(transformers.Qwen3VLMoeForConditionalGeneration(cfg), path)
    # transformers 5.24 saves the experts [E, out, in]; the checkpoints vLLM
    # loads (and transformers' conversion_mapping "qwen3_vl_moe" Transpose(1,
    # 2) reads) store them [E, in, out]. Write both layouts.
    layouts = {"hub": {}, "untransposed": {}}
    for name, a in arrays.items():
        out_first = ".mlp.experts." in name and a.shape[2] == H  # [E, 2I, H] / [E, H, I]
        if name.endswith("down_proj"):
            out_first = a.shape[1] == H
        flip = np.ascontiguousarray(a.transpose(0, 2, 1)) if ".mlp.experts." in name else a
        layouts["hub"][name] = flip if out_first else a
        layouts["untransposed"][name] = a if out_first else flip
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert layouts["hub"][gate_up].shape == (E, H, 2 * INTER)
    untransposed = path / "untransposed"
    untransposed.mkdir()
    safetensors.numpy.save_file(layouts["untransposed"], untransposed / "model.safetensors")
    (untransposed / "config.json").write_text((path / "config.json").read_text())
    safetensors.numpy.save_file(layouts["hub"], path / "model.safetensors")
    return path, layouts["hub"]


def qwen3_vl_moe_text(expert_parallel):
    def expected(name, a, rank, world):
        if "visual." in name:
            return None  # vision: see the vision-tower tests
        if ".mlp.experts." in name:
            return transposed_experts(name, a, rank, world, expert_parallel)
        return llama_text(name, a, rank, world)

    return expected


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_qwen3_vl_moe_transposed_experts(qwen3_vl_moe, world, expert_parallel):
    path, arrays = qwen3_vl_moe
    check(
        path,
        arrays,
        qwen3_vl_moe_text(expert_parallel),
        world,
        include=lambda n: "visual." not in n,
        expert_parallel=expert_parallel,
    )


def test_qwen3_vl_moe_experts_in_the_other_layout_raise(qwen3_vl_moe):
    path, _ = qwen3_vl_moe  # vLLM would transpose [E, out, in] into the wrong shape
    match = r"experts\.(gate_up|down)_proj.*hidden_size 64 on dim [12]"
    with pytest.raises(ShardingError, match=match):
        gpuload.load_sharded(path / "untransposed", 0, 2, device="cpu")


# --- 5. GPTQ, AWQ, compressed-tensors pack-quantized -------------------------
# Logical weights [out, in]; 4 bits, 8 values an int32 word; groups of 32.
# Column-parallel layers (q by heads, k/v by kv heads, gate/up) split their
# out axis, row-parallel ones (o, down) their in axis, on every tensor of the
# layer in proportion (words, groups):
#   GPTQ  auto_gptq.py AutoGPTQLinearMethod.create_weights: qweight
#         [in/8, out] (packed_dim 0), qzeros [in/g, out/8], scales [in/g, out];
#         group_size -1 and row-parallel: scales and qzeros whole
#         (marlin_utils.py marlin_repeat_scales_on_all_ranks); g_idx dropped
#         (base_config.py get_checkpoint_weight_mapper), so whole here.
#   AWQ   auto_awq.py AutoAWQMarlinLinearMethod.create_weights: qweight
#         [in, out/8], qzeros [in/g, out/8], scales [in/g, out].
#   CT    compressed_tensors_wNa16.py CompressedTensorsWNA16.create_weights:
#         weight_packed [out, in/8], weight_scale [out, in/g],
#         weight_zero_point [out/8, in/g], weight_shape whole.
Q_HEADS, Q_KV, Q_HD, Q_HIDDEN, Q_INTER, GROUP = 8, 2, 32, 256, 512, 32
LAYERS = {  # layer -> (out, in, how the out axis splits | "row" for the in axis)
    "self_attn.q_proj": (Q_HEADS * Q_HD, Q_HIDDEN, "heads"),
    "self_attn.k_proj": (Q_KV * Q_HD, Q_HIDDEN, "kv"),
    "self_attn.v_proj": (Q_KV * Q_HD, Q_HIDDEN, "kv"),
    "self_attn.o_proj": (Q_HIDDEN, Q_HEADS * Q_HD, "row"),
    "mlp.gate_proj": (Q_INTER, Q_HIDDEN, "heads"),
    "mlp.up_proj": (Q_INTER, Q_HIDDEN, "heads"),
    "mlp.down_proj": (Q_HIDDEN, Q_INTER, "row"),
}
# format -> suffix -> (shape from (out, in, g), the tensor axis of out, of in)
FORMATS = {
    "gptq": {
        "qweight": (lambda o, i, g: (i // 8, o), 1, 0),
        "qzeros": (lambda o, i, g: (i // g, o // 8), 1, 0),
        "scales": (lambda o, i, g: (i // g, o), 1, 0),
        "g_idx": (lambda o, i, g: (i,), None, None),
    },
    "awq": {
        "qweight": (lambda o, i, g: (i, o // 8), 1, 0),
        "qzeros": (lambda o, i, g: (i // g, o // 8), 1, 0),
        "scales": (lambda o, i, g: (i // g, o), 1, 0),
    },
    "compressed-tensors": {
        "weight_packed": (lambda o, i, g: (o, i // 8), 0, 1),
        "weight_scale": (lambda o, i, g: (o, i // g), 0, 1),
        "weight_zero_point": (lambda o, i, g: (o // 8, i // g), 0, 1),
        "weight_shape": (lambda o, i, g: (2,), None, None),
    },
}
DTYPE = {"scales": "F16", "weight_scale": "F16", "weight_shape": "I64"}


def quant_config(fmt: str, group: int, desc_act: bool = False) -> dict:
    if fmt == "compressed-tensors":
        weights = {"num_bits": 4, "type": "int", "symmetric": False, "group_size": group}
        weights["strategy"] = "group" if group > 0 else "channel"
        group_0 = {"targets": ["Linear"], "weights": weights, "format": "pack-quantized"}
        return {"quant_method": fmt, "format": "pack-quantized", "config_groups": {"g": group_0}}
    return {"quant_method": fmt, "bits": 4, "group_size": group, "desc_act": desc_act}


def write_quantized(path, fmt: str, group: int = GROUP, desc_act: bool = False, layers=LAYERS):
    rng = np.random.default_rng(5)
    arrays = {
        "model.embed_tokens.weight": rng.standard_normal((128, Q_HIDDEN), np.float32),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(Q_HIDDEN, np.float32),
    }
    for layer, (out, inp, _) in layers.items():
        g = group if group > 0 else inp
        for suffix, (shape, _, _) in FORMATS[fmt].items():
            dt = DTYPE.get(suffix, "I32")
            kind = {"F16": np.float16, "I64": np.int64}.get(dt, np.int32)
            n = int(np.prod(shape(out, inp, g)))
            a = np.frombuffer(rng.bytes(n * np.dtype(kind).itemsize), kind)
            a = a.reshape(shape(out, inp, g))  # random bits: the bytes are compared
            arrays[f"model.layers.0.{layer}.{suffix}"] = a
    dtypes = {
        n: {np.float32: "F32", np.float16: "F16", np.int64: "I64"}.get(a.dtype.type, "I32")
        for n, a in arrays.items()
    }
    path.mkdir(parents=True, exist_ok=True)
    write_tensors(path / "model.safetensors", arrays, dtypes)
    config = {
        "model_type": "llama",
        "num_attention_heads": Q_HEADS,
        "num_key_value_heads": Q_KV,
        "hidden_size": Q_HIDDEN,
        "quantization_config": quant_config(fmt, group, desc_act),
    }
    (path / "config.json").write_text(json.dumps(config))
    return arrays


def quant_expected(fmt):
    def expected(name, a, rank, world):
        layer, _, suffix = name.removeprefix("model.layers.0.").rpartition(".")
        if layer not in LAYERS:
            return llama_text(name, a, rank, world)
        _, out_axis, in_axis = FORMATS[fmt][suffix]
        how = LAYERS[layer][2]
        if out_axis is None:
            return a
        if how == "row":
            if a.shape[in_axis] == 1:  # channelwise beside a row split: whole
                return a
            return rows(a, rank, world, axis=in_axis)
        if how == "kv":
            return kv_heads(a, Q_KV, rank, world, axis=out_axis)
        return rows(a, rank, world, axis=out_axis)

    return expected


@pytest.fixture(
    scope="module",
    params=[
        ("gptq", GROUP),
        ("gptq", -1),
        ("awq", GROUP),
        ("compressed-tensors", GROUP),
        ("compressed-tensors", -1),
    ],
)
def quantized(request, tmp_path_factory):
    fmt, group = request.param
    path = tmp_path_factory.mktemp(fmt) / "m"
    return fmt, path, write_quantized(path, fmt, group)


@pytest.mark.parametrize("world", WORLDS)
def test_packed_quantized_layers_split_as_vllm(quantized, world):
    fmt, path, arrays = quantized
    check(path, arrays, quant_expected(fmt), world)
    _, report = gpuload.load_sharded(path, 0, world, device="cpu", return_report=True)
    assert not report.unknown


def test_gptq_desc_act_is_refused_as_vllm_does(tmp_path):
    write_quantized(tmp_path, "gptq", desc_act=True)
    with pytest.raises(ShardingError, match="config.json.*desc_act=True"):
        gpuload.load_sharded(tmp_path, 0, 2, device="cpu")


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_a_split_inside_a_group_raises(tmp_path, fmt):
    write_quantized(tmp_path, fmt, group=128)  # o_proj: 256 in features, 32 a rank at world 8
    with pytest.raises(ShardingError, match="o_proj.*cut through quantization groups of 128"):
        gpuload.load_sharded(tmp_path, 1, 8, device="cpu")


@pytest.mark.parametrize("fmt", ["gptq", "awq", "compressed-tensors"])
def test_a_split_inside_a_packed_word_raises(tmp_path, fmt):
    # 4 of q_proj's 32 out features a rank at world 8: half an int32 word of 8.
    layers = {"self_attn.q_proj": (32, Q_HIDDEN, "heads")}
    write_quantized(tmp_path, fmt, layers=layers)
    with pytest.raises(ShardingError, match="q_proj.*cut through packed int32 words of 8"):
        gpuload.load_sharded(tmp_path, 1, 8, device="cpu")


# --- 4. Mixtral experts named gate/up/down_proj (compressed-tensors FP8) ------
# vLLM mixtral.py MixtralModel.hf_to_vllm_mapper maps .gate_proj./.up_proj./
# .down_proj. to w1/w3/w2; FusedMoE._load_w13 splits w1/w3 rows, _load_w2
# down's columns, and _load_per_channel_weight_scale splits gate/up's
# [I, 1] weight_scale like their rows and copies down's [H, 1] whole. Under
# expert parallelism a rank holds E / world whole experts.
M_E, M_H, M_I = 8, 64, 96


@pytest.fixture(scope="module")
def mixtral_ct(tmp_path_factory):
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("mixtral_ct")
    arrays, dtypes = {}, {}

    def add(name, shape, dtype):
        kind = {"F32": np.float32, "F8_E4M3": np.uint8}[dtype]
        n = int(np.prod(shape)) * np.dtype(kind).itemsize
        arrays[name] = np.frombuffer(rng.bytes(n), kind).reshape(shape)
        dtypes[name] = dtype

    add("model.embed_tokens.weight", (128, M_H), "F32")
    pre = "model.layers.0"
    add(f"{pre}.self_attn.q_proj.weight", (8 * 8, M_H), "F32")
    add(f"{pre}.self_attn.k_proj.weight", (2 * 8, M_H), "F32")
    add(f"{pre}.self_attn.o_proj.weight", (M_H, 8 * 8), "F32")
    add(f"{pre}.block_sparse_moe.gate.weight", (M_E, M_H), "F32")
    for e in range(M_E):
        x = f"{pre}.block_sparse_moe.experts.{e}"
        for proj, shape in (("gate_proj", (M_I, M_H)), ("up_proj", (M_I, M_H))):
            add(f"{x}.{proj}.weight", shape, "F8_E4M3")
            add(f"{x}.{proj}.weight_scale", (M_I, 1), "F32")
            add(f"{x}.{proj}.input_scale", (1,), "F32")
        add(f"{x}.down_proj.weight", (M_H, M_I), "F8_E4M3")
        add(f"{x}.down_proj.weight_scale", (M_H, 1), "F32")
    write_tensors(path / "model.safetensors", arrays, dtypes)
    config = {
        "model_type": "mixtral",
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": M_H,
        "num_local_experts": M_E,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path, arrays


def mixtral_expected(expert_parallel):
    def expected(name, a, rank, world):
        if ".experts." not in name:
            return llama_text(name, a, rank, world)
        if expert_parallel:
            e = int(name.split(".experts.")[1].split(".")[0])
            per = M_E // world
            return a if rank * per <= e < (rank + 1) * per else None
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return rows(a, rank, world)
        if name.endswith(("gate_proj.weight_scale", "up_proj.weight_scale")):
            return rows(a, rank, world)  # per channel: the rows' scales
        if name.endswith("down_proj.weight"):
            return rows(a, rank, world, axis=1)
        return a  # down_proj's per-channel scale, input scales

    return expected


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_mixtral_gate_up_down_proj_experts(mixtral_ct, world, expert_parallel):
    path, arrays = mixtral_ct
    check(path, arrays, mixtral_expected(expert_parallel), world, expert_parallel=expert_parallel)
    _, report = gpuload.load_sharded(path, 0, world, device="cpu", return_report=True)
    assert not report.unknown


# --- 3. Vision towers: tensor-parallel by default ----------------------------
# vLLM config/multimodal.py MultiModalConfig.mm_encoder_tp_mode defaults to
# "weights"; "data" is honoured only by models with supports_encoder_tp_data
# (Qwen2/2.5/3-VL, Llama 4 here), others fall back to "weights"
# (config/model.py ModelConfig.__post_init__). Per tower, in order, first
# match; anything else (embeddings, convolutions, norms, nn.Linear and
# nn.Parameter tensors, row-parallel biases) whole:
QKV3 = "qkv3"  # q | k | v sections, each split on its own (QKVParallelLinear)
ENC = r"vision_tower\.(vision_model\.)?encoder\.layers\.\d+\."
VISION_RULES = {
    # siglip.py SiglipAttention / SiglipMLP, clip.py CLIPAttention / CLIPMLP;
    # llava.py LlavaMultiModalProjector linear_1 column-, linear_2 row-parallel.
    "siglip_clip": [
        (ENC + r"self_attn\.[qkv]_proj\.(weight|bias)$", "rows"),
        (ENC + r"self_attn\.out_proj\.weight$", "cols"),
        (ENC + r"mlp\.fc1\.(weight|bias)$", "rows"),
        (ENC + r"mlp\.fc2\.weight$", "cols"),
        (r"multi_modal_projector\.linear_1\.(weight|bias)$", "rows"),
        (r"multi_modal_projector\.linear_2\.weight$", "cols"),
    ],
    # pixtral.py PixtralHFAttention / PixtralHFMLP; mistral3.py
    # Mistral3MultiModalProjector (patch_merger.merging_layer an nn.Linear).
    "pixtral": [
        (r"attention\.[qkv]_proj\.weight$", "rows"),
        (r"attention\.o_proj\.weight$", "cols"),
        (r"feed_forward\.(gate|up)_proj\.weight$", "rows"),
        (r"feed_forward\.down_proj\.weight$", "cols"),
        (r"multi_modal_projector\.linear_1\.weight$", "rows"),
        (r"multi_modal_projector\.linear_2\.weight$", "cols"),
    ],
    # qwen2_vl.py Qwen2VisionAttention: qkv a plain ColumnParallelLinear (the
    # fused rows split evenly, all-gathered and re-split in split_qkv).
    "qwen2_vl": [
        (r"attn\.qkv\.(weight|bias)$", "rows"),
        (r"attn\.proj\.weight$", "cols"),
        (r"mlp\.fc1\.(weight|bias)$", "rows"),
        (r"mlp\.fc2\.weight$", "cols"),
        (r"merger\.mlp\.0\.(weight|bias)$", "rows"),
        (r"merger\.mlp\.2\.weight$", "cols"),
    ],
    # qwen2_5_vl.py Qwen2_5_VisionAttention (QKVParallelLinear), VisionMLP
    # (gate/up MergedColumnParallelLinear with biases), PatchMerger.
    "qwen2_5_vl": [
        (r"attn\.qkv\.(weight|bias)$", QKV3),
        (r"attn\.proj\.weight$", "cols"),
        (r"mlp\.(gate|up)_proj\.(weight|bias)$", "rows"),
        (r"mlp\.down_proj\.weight$", "cols"),
        (r"merger\.mlp\.0\.(weight|bias)$", "rows"),
        (r"merger\.mlp\.2\.weight$", "cols"),
    ],
    # qwen3_vl.py Qwen3_VisionBlock (Qwen2_5_VisionAttention), Qwen3_VisionMLP
    # and Qwen3_VisionPatchMerger (merger, deepstack_merger_list).
    "qwen3_vl": [
        (r"attn\.qkv\.(weight|bias)$", QKV3),
        (r"attn\.proj\.weight$", "cols"),
        (r"linear_fc1\.(weight|bias)$", "rows"),
        (r"linear_fc2\.weight$", "cols"),
    ],
    # mllama4.py Llama4VisionAttention (QKVParallelLinear with biases),
    # Llama4VisionMLP (layers and vision_adapter), Llama4UnfoldConvolution
    # .linear, Llama4MultiModalProjector.linear_1 (also in "data" mode).
    "llama4": [
        (r"self_attn\.[qkv]_proj\.(weight|bias)$", "rows"),
        (r"self_attn\.o_proj\.weight$", "cols"),
        (r"mlp\.fc1\.(weight|bias)$", "rows"),
        (r"mlp\.fc2\.weight$", "cols"),
        (r"patch_embedding\.linear\.weight$", "rows"),
        (r"multi_modal_projector\.linear_1\.weight$", "rows"),
    ],
}
VISION_DATA = {"llama4": [(r"multi_modal_projector\.linear_1\.weight$", "rows")]}
VISION_PREFIX = re.compile(r"(^|\.)(vision_tower|vision_model|visual|multi_modal_projector)\.")


def vision_expected(tower, data, text):
    rules = VISION_DATA.get(tower, []) if data else VISION_RULES[tower]

    def expected(name, a, rank, world):
        if not VISION_PREFIX.search(name):
            return text(name, a, rank, world)
        how = next((h for pattern, h in rules if re.search(pattern, name)), "whole")
        if how == "rows":
            return rows(a, rank, world)
        if how == "cols":
            return rows(a, rank, world, axis=1)
        if how == QKV3:
            return sections(a, (a.shape[0] // 3,) * 3, rank, world, axis=0)
        return a

    return expected


def tiny_vlm(kind, path):
    """A transformers-built tiny vision-language model of ``kind``: 8 vision heads."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
    )
    vit = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=8)
    vit.update(image_size=28, patch_size=14)
    mrope = {"type": "mrope", "mrope_section": [1, 1, 2]}
    qwen_vit = dict(depth=1, num_heads=8, patch_size=2, temporal_patch_size=2)
    qwen_vit.update(spatial_merge_size=2)
    if kind == "llava":
        cfg = tf.LlavaConfig(
            text_config=dict(model_type="llama", **text),
            vision_config=dict(model_type="clip_vision_model", projection_dim=32, **vit),
        )
        model = tf.LlavaForConditionalGeneration(cfg)
    elif kind == "gemma3":
        cfg = tf.Gemma3Config(
            text_config=dict(model_type="gemma3_text", **text),
            vision_config=dict(model_type="siglip_vision_model", vision_use_head=False, **vit),
            mm_tokens_per_image=4,
        )
        model = tf.Gemma3ForConditionalGeneration(cfg)
    elif kind == "mistral3":
        cfg = tf.Mistral3Config(
            text_config=dict(model_type="mistral", **text),
            vision_config=dict(model_type="pixtral", head_dim=4, **vit),
        )
        model = tf.Mistral3ForConditionalGeneration(cfg)
    elif kind == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(
            text_config=dict(model_type="qwen2_vl_text", rope_scaling=mrope, **text),
            vision_config=dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **qwen_vit),
        )
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    else:
        assert kind == "qwen2_5_vl"
        vision = dict(hidden_size=32, out_hidden_size=64, intermediate_size=64, **qwen_vit)
        cfg = tf.Qwen2_5_VLConfig(
            text_config=dict(model_type="qwen2_5_vl_text", rope_scaling=mrope, **text),
            vision_config=dict(fullatt_block_indexes=[0], **vision),
        )
        model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
    return save(model, path)


TOWERS = {  # model -> (tower rules, vLLM supports mm_encoder_tp_mode="data")
    "llava": ("siglip_clip", False),
    "gemma3": ("siglip_clip", False),
    "mistral3": ("pixtral", False),
    "qwen2_vl": ("qwen2_vl", True),
    "qwen2_5_vl": ("qwen2_5_vl", True),
}


@pytest.fixture(scope="module", params=list(TOWERS))
def vlm(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, tiny_vlm(request.param, path)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("vision_tp", ["weights", "data"])
def test_vision_towers_split_as_vllm(vlm, world, vision_tp):
    kind, path, arrays = vlm
    tower, has_data = TOWERS[kind]
    expected = vision_expected(tower, vision_tp == "data" and has_data, llama_text)
    check(path, arrays, expected, world, vision_tp=vision_tp)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("vision_tp", ["weights", "data"])
def test_llama4_and_qwen3_vl_moe_towers(llama4, qwen3_vl_moe, world, vision_tp):
    data = vision_tp == "data"  # both support it in vLLM
    path, arrays = llama4
    check(
        path,
        arrays,
        vision_expected("llama4", data, llama4_text(False)),
        world,
        vision_tp=vision_tp,
    )
    path, arrays = qwen3_vl_moe
    expected = vision_expected("qwen3_vl", data, qwen3_vl_moe_text(False))
    check(path, arrays, expected, world, vision_tp=vision_tp)


# --- 2. FP8 block-quantized experts whose rank share cuts the blocks ----------
# vLLM fused_moe/oracle/fp8.py refine_fp8_moe_block_shape: with 128x128
# blocks and intermediate I = 384, a rank holds I / world rows of gate/up (and
# columns of down); when that cuts the blocks and gcd(128, 128, I / world, H)
# >= 32, routed_experts.py repeat_interleaves the scales onto the finer grid
# before the usual narrow, so a rank holds the scales of every 128-block its
# rows touch (world 4: 96 rows a rank, rank 1 rows 96..191 -> scale rows 0:2
# of 3). Below 32 (world 8: 48 rows) vLLM refuses
# (validate_fp8_block_shape_moe), as it does for dense layers
# (BlockQuantScaleParameter).
F_E, F_H, F_I, BLOCK = 2, 256, 384, 128


@pytest.fixture(scope="module")
def fp8_moe(tmp_path_factory):
    rng = np.random.default_rng(9)
    path = tmp_path_factory.mktemp("fp8_moe")
    arrays, dtypes = {}, {}

    def add(name, shape, dtype):
        kind = {"F32": np.float32, "F8_E4M3": np.uint8}[dtype]
        n = int(np.prod(shape)) * np.dtype(kind).itemsize
        arrays[name] = np.frombuffer(rng.bytes(n), kind).reshape(shape)
        dtypes[name] = dtype

    for e in range(F_E):
        x = f"model.layers.0.mlp.experts.{e}"
        for proj in ("gate_proj", "up_proj"):
            add(f"{x}.{proj}.weight", (F_I, F_H), "F8_E4M3")
            add(f"{x}.{proj}.weight_scale_inv", (F_I // BLOCK, F_H // BLOCK), "F32")
        add(f"{x}.down_proj.weight", (F_H, F_I), "F8_E4M3")
        add(f"{x}.down_proj.weight_scale_inv", (F_H // BLOCK, F_I // BLOCK), "F32")
    add("model.layers.0.mlp.gate.weight", (F_E, F_H), "F32")
    write_tensors(path / "model.safetensors", arrays, dtypes)
    config = {
        "model_type": "qwen3_moe",
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": F_H,
        "num_experts": F_E,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]},
    }
    (path / "config.json").write_text(json.dumps(config))
    return path, arrays


def touched_blocks(a, rank, world, axis):
    """The scale blocks that a rank's I / world elements touch along ``axis``."""
    per = F_I // world
    lo, hi = rank * per // BLOCK, -(-(rank + 1) * per // BLOCK)
    return np.take(a, range(lo, hi), axis=axis)


def fp8_moe_expected(name, a, rank, world):
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return rows(a, rank, world)
    if name.endswith("down_proj.weight"):
        return rows(a, rank, world, axis=1)
    if name.endswith(("gate_proj.weight_scale_inv", "up_proj.weight_scale_inv")):
        return touched_blocks(a, rank, world, axis=0)
    if name.endswith("down_proj.weight_scale_inv"):
        return touched_blocks(a, rank, world, axis=1)
    return a


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_expert_blocks_cut_by_the_split_are_refined(fp8_moe, world):
    path, arrays = fp8_moe
    check(path, arrays, fp8_moe_expected, world)


def test_fp8_expert_blocks_too_fine_to_refine_raise(fp8_moe):
    path, _ = fp8_moe  # world 8: gcd(128, 128, 48, 256) = 16 < 32
    with pytest.raises(ShardingError, match="experts.*cut through quantization blocks of 128"):
        gpuload.load_sharded(path, 1, 8, device="cpu")
    # Expert parallelism holds whole experts: nothing to refine.
    for rank in range(2):
        got = gpuload.load_sharded(path, rank, 2, device="cpu", expert_parallel=True)
        name = f"model.layers.0.mlp.experts.{rank}.down_proj.weight_scale_inv"
        assert got[name].tobytes() == fp8_moe[1][name].tobytes()


def test_fp8_dense_blocks_cut_by_the_split_still_raise(tmp_path):
    # vLLM refines experts only; a dense layer's BlockQuantScaleParameter
    # cannot take a rank share that cuts its blocks.
    w = np.zeros((F_I, F_H), np.uint8)
    s = np.zeros((F_I // BLOCK, F_H // BLOCK), np.float32)
    arrays = {"model.layers.0.mlp.gate_proj.weight": w}
    arrays["model.layers.0.mlp.gate_proj.weight_scale_inv"] = s
    dtypes = {n: "F8_E4M3" if a.dtype == np.uint8 else "F32" for n, a in arrays.items()}
    write_tensors(tmp_path / "model.safetensors", arrays, dtypes)
    config = {"model_type": "qwen3", "quantization_config": {"weight_block_size": [128, 128]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShardingError, match="gate_proj.*cut through quantization blocks"):
        gpuload.load_sharded(tmp_path, 1, 4, device="cpu")


# --- 7. gpt-oss: bf16 (transformers) and MXFP4 (by hand) ---------------------
# vLLM gpt_oss.py GptOssModel._load_weights_other: per = cdiv(I, tp), a rank's
# intermediate range [r * per, min((r + 1) * per, I)); gate_up_proj [E, H, 2I]
# (gate/up interleaved) takes dim 2 [2s, 2e), its bias dim 1 [2s, 2e),
# down_proj [E, I, H] dim 1 [s, e), down_proj_bias rank 0 only (zeroed
# elsewhere). _load_weights_mxfp4: the same in whole 32-blocks, per =
# cdiv(I / 32, tp) * 32: gate_up_proj_blocks/_scales/_bias dim 1 [2s, 2e),
# down_proj_blocks/_scales dim 2 [s / 32, e / 32). Under expert parallelism
# experts [r * E / w, (r + 1) * E / w) of every expert tensor. Sinks split by
# head (make_attention_sink(num_heads // tp)), the router whole.
G_E, G_H = 8, 64


def gpt_oss_range(inter, rank, world, block):
    per = -(-(inter // block) // world) * block
    return rank * per, min((rank + 1) * per, inter)


def gpt_oss_expected(inter, block, expert_parallel):
    def expected(name, a, rank, world):
        if ".mlp.experts." not in name:
            if name.endswith("sinks"):
                return rows(a, rank, world)
            if name.endswith(("o_proj.bias", "router.bias")):
                return a
            return llama_text(name, a, rank, world)
        if expert_parallel:
            return rows(a, rank, world)
        s, e = gpt_oss_range(inter, rank, world, block)
        leaf = name.rsplit(".", 1)[1]
        if leaf == "down_proj_bias":
            return a if rank == 0 else None
        if leaf == "gate_up_proj":  # bf16 [E, H, 2I]
            return a[:, :, 2 * s : 2 * e]
        if leaf.startswith("gate_up_proj"):  # [E, 2I, ...]
            return a[:, 2 * s : 2 * e]
        if leaf == "down_proj":  # bf16 [E, I, H]
            return a[:, s:e]
        return a[:, :, s // 32 : e // 32]  # down_proj_blocks / _scales

    return expected


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(
        hidden_size=G_H,
        intermediate_size=90,  # world 4: 23, 23, 23, 21
        num_hidden_layers=1,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
        num_local_experts=G_E,
        num_experts_per_tok=2,
        layer_types=["full_attention"],
    )
    path = tmp_path_factory.mktemp("gpt_oss")
    return path, save(transformers.GptOssForCausalLM(cfg), path)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_gpt_oss_bf16_experts_uneven_intermediate(gpt_oss, world, expert_parallel):
    path, arrays = gpt_oss
    expected = gpt_oss_expected(90, 1, expert_parallel)
    check(path, arrays, expected, world, expert_parallel=expert_parallel)


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory, gpt_oss):
    """gpt-oss's MXFP4 layout (as openai/gpt-oss-20b stores it), by hand:
    I = 288 = 9 blocks of 32, so world 4 gives 96, 96, 96, 0 and world 8
    64, 64, 64, 64, 32, 0, 0, 0."""
    src, bf16 = gpt_oss
    rng = np.random.default_rng(11)
    inter = 288
    arrays = {n: a for n, a in bf16.items() if ".mlp.experts." not in n}
    dtypes = dict.fromkeys(arrays, "F32")
    x = "model.layers.0.mlp.experts"
    shapes = {
        f"{x}.gate_up_proj_blocks": ((G_E, 2 * inter, G_H // 32, 16), "U8"),
        f"{x}.gate_up_proj_scales": ((G_E, 2 * inter, G_H // 32), "U8"),
        f"{x}.gate_up_proj_bias": ((G_E, 2 * inter), "F32"),
        f"{x}.down_proj_blocks": ((G_E, G_H, inter // 32, 16), "U8"),
        f"{x}.down_proj_scales": ((G_E, G_H, inter // 32), "U8"),
        f"{x}.down_proj_bias": ((G_E, G_H), "F32"),
    }
    for name, (shape, dt) in shapes.items():
        kind = np.uint8 if dt == "U8" else np.float32
        n = int(np.prod(shape)) * np.dtype(kind).itemsize
        arrays[name], dtypes[name] = np.frombuffer(rng.bytes(n), kind).reshape(shape), dt
    path = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    write_tensors(path / "model.safetensors", arrays, dtypes)
    config = json.loads((src / "config.json").read_text())
    config.update(intermediate_size=inter, quantization_config={"quant_method": "mxfp4"})
    (path / "config.json").write_text(json.dumps(config))
    return path, arrays


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_gpt_oss_mxfp4_whole_blocks_a_rank(gpt_oss_mxfp4, world, expert_parallel):
    path, arrays = gpt_oss_mxfp4
    expected = gpt_oss_expected(288, 32, expert_parallel)
    check(path, arrays, expected, world, expert_parallel=expert_parallel)


# --- 8. More families: GLM4-MoE, PhiMoE (transformers-built) -----------------
# vLLM glm4_moe.py Glm4MoE: gate (GateLinear) and e_score_correction_bias
# whole, routed experts through FusedMoE (gate/up rows, down columns; EP: whole
# experts), shared_experts a Glm4MoeMLP split also under EP, dense first
# layers a Glm4MoeMLP. vLLM phimoe.py: Mixtral-style w1/w3 rows, w2 columns,
# QKVParallelLinear and RowParallelLinear with biases (o_proj's whole), and a
# ParallelLMHead with a bias split by vocab like its weight.
def moe_expected(num_experts, expert_parallel):
    def expected(name, a, rank, world):
        if ".experts." in name and ".shared_experts." not in name:
            if expert_parallel:
                e = int(name.split(".experts.")[1].split(".")[0])
                per = num_experts // world
                return a if rank * per <= e < (rank + 1) * per else None
            if name.endswith((".w1.weight", ".w3.weight", "gate_proj.weight", "up_proj.weight")):
                return rows(a, rank, world)
            return rows(a, rank, world, axis=1)  # w2 / down_proj
        if name.endswith("lm_head.bias"):
            return vocab(a, rank, world)
        if name.endswith(("o_proj.bias", "e_score_correction_bias")):
            return a
        return llama_text(name, a, rank, world)

    return expected


def tiny_moe(kind, path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, vocab_size=128)
    if kind == "glm4_moe":
        cfg = tf.Glm4MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            head_dim=8,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            use_qk_norm=True,
            attention_bias=True,
            **common,
        )
        return save(tf.Glm4MoeForCausalLM(cfg), path)
    if kind == "qwen3_next":
        cfg = tf.Qwen3NextConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            num_hidden_layers=2,
            head_dim=8,
            num_experts=8,
            num_experts_per_tok=2,
            linear_num_key_heads=8,
            linear_num_value_heads=16,
            linear_key_head_dim=4,
            linear_value_head_dim=4,
            linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "full_attention"],
            **common,
        )
        return save(tf.Qwen3NextForCausalLM(cfg), path)
    cfg = tf.PhimoeConfig(
        intermediate_size=32,
        num_hidden_layers=1,
        num_local_experts=8,
        num_experts_per_tok=2,
        lm_head_bias=True,
        attention_bias=True,
        **common,
    )
    return save(tf.PhimoeForCausalLM(cfg), path)


# vLLM qwen3_next.py Qwen3NextAttention: q_proj a QKVParallelLinear of
# 2 * heads (q and its output gate, per head), k/v by kv heads; the
# GatedDeltaNet (layers/mamba/gdn/qwen_gdn_linear_attn.py, interleaved
# layout): in_proj_qkvz and in_proj_ba one section each (even rows),
# conv1d q | k | v (key_dim, key_dim, value_dim) each split
# (mamba_v2_sharded_weight_loader), A_log and dt_bias rows
# (sharded_weight_loader(0)), out_proj columns, norm whole; MoE as Qwen3-MoE
# with a shared_expert (split) and shared_expert_gate (whole).
KEY_DIM, VALUE_DIM = 8 * 4, 16 * 4


def qwen3_next_expected(expert_parallel):
    moe = moe_expected(8, expert_parallel)

    def expected(name, a, rank, world):
        if name.endswith("conv1d.weight"):
            return sections(a, (KEY_DIM, KEY_DIM, VALUE_DIM), rank, world, axis=0)
        if name.endswith(("in_proj_qkvz.weight", "in_proj_ba.weight", "A_log", "dt_bias")):
            return rows(a, rank, world)
        if name.endswith("out_proj.weight"):
            return rows(a, rank, world, axis=1)
        return moe(name, a, rank, world)

    return expected


@pytest.fixture(scope="module", params=["glm4_moe", "phimoe"])
def moe_family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return path, tiny_moe(request.param, path)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_glm4_moe_and_phimoe(moe_family, world, expert_parallel):
    path, arrays = moe_family
    check(path, arrays, moe_expected(8, expert_parallel), world, expert_parallel=expert_parallel)
    _, report = gpuload.load_sharded(path, 0, world, device="cpu", return_report=True)
    assert not report.unknown


@pytest.fixture(scope="module")
def qwen3_next(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_next")
    return path, tiny_moe("qwen3_next", path)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_qwen3_next(qwen3_next, world, expert_parallel):
    path, arrays = qwen3_next
    expected = qwen3_next_expected(expert_parallel)
    check(path, arrays, expected, world, expert_parallel=expert_parallel)
    _, report = gpuload.load_sharded(path, 0, world, device="cpu", return_report=True)
    assert not report.unknown
