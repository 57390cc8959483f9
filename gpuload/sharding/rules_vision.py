"""Sharding rules of vision encoders and their projectors, as data.

Kept apart from :mod:`gpuload.sharding.rules` (the text models) because the mode
matters: vLLM's ``mm_encoder_tp_mode`` picks between these tables, and the
encoder's head count comes from ``vision_config``, not the text model's.
:class:`gpuload.sharding.sharder.Sharder` puts the chosen table, then :data:`VISION`,
before the text family's.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpuload.sharding.rules import FusedQKV, Heads, Replicate, Split, Table

# Vision encoders and projectors. vLLM's mm_encoder_tp_mode defaults to
# "weights" (config/multimodal.py MultiModalConfig): the encoder's linears are
# tensor-parallel like the text model's, with the vision head count; patch
# and position embeddings, convolutions, norms and plain nn.Linear / Parameter
# tensors stay whole. "data" replicates the encoder, but only in models that
# support it (supports_encoder_tp_data); others fall back to "weights"
# (config/model.py ModelConfig.__post_init__). Column-parallel biases split
# with their rows, row-parallel biases stay whole.
_V = r"\.layers\.\d+\."
_ENC = r"(^|\.)vision_(tower|model)\.(vision_model\.)?encoder\.layers\.\d+\."
_SIGLIP_CLIP_PIXTRAL: Table = (
    # siglip.py SiglipAttention / SiglipMLP, clip.py CLIPAttention / CLIPMLP:
    # QKVParallelLinear over the vision heads, out_proj and fc2 row-parallel.
    # Hub checkpoints name them vision_tower.vision_model.encoder..., those
    # transformers 5 saves vision_tower.encoder...
    (rf"{_ENC}self_attn\.[qkv]_proj\.(weight|bias)$", Heads(vision=True)),
    (rf"{_ENC}self_attn\.out_proj\.weight$", Split(1)),
    (rf"{_ENC}mlp\.fc1\.(weight|bias)$", Split(0)),
    (rf"{_ENC}mlp\.fc2\.weight$", Split(1)),
    # pixtral.py PixtralHFAttention / PixtralHFMLP (Mistral 3, Pixtral LLaVA).
    (rf"(^|\.)vision_tower\.transformer{_V}attention\.[qkv]_proj\.weight$", Heads(vision=True)),
    (rf"(^|\.)vision_tower\.transformer{_V}attention\.o_proj\.weight$", Split(1)),
    (rf"(^|\.)vision_tower\.transformer{_V}feed_forward\.(gate|up)_proj\.weight$", Split(0)),
    (rf"(^|\.)vision_tower\.transformer{_V}feed_forward\.down_proj\.weight$", Split(1)),
    # llava.py LlavaMultiModalProjector, mistral3.py Mistral3MultiModalProjector
    # (their patch_merger.merging_layer is an nn.Linear: whole).
    (r"(^|\.)multi_modal_projector\.linear_1\.(weight|bias)$", Split(0)),
    (r"(^|\.)multi_modal_projector\.linear_2\.weight$", Split(1)),
)
_QWEN_VISION_MERGER: Table = (
    # qwen2_vl.py Qwen2VisionPatchMerger, qwen2_5_vl.py Qwen2_5_VisionPatchMerger:
    # mlp.0 column-, mlp.2 row-parallel.
    (r"(^|\.)visual\.merger\.mlp\.0\.(weight|bias)$", Split(0)),
    (r"(^|\.)visual\.merger\.mlp\.2\.weight$", Split(1)),
)
_QWEN2_VL_VISION: Table = (
    # qwen2_vl.py Qwen2VisionAttention: qkv is a plain ColumnParallelLinear
    # (an even split of the fused rows, not per section), proj row-parallel;
    # Qwen2VisionMLP fc1 column-, fc2 row-parallel.
    (r"(^|\.)visual\.blocks\.\d+\.attn\.qkv\.(weight|bias)$", Split(0)),
    (r"(^|\.)visual\.blocks\.\d+\.attn\.proj\.weight$", Split(1)),
    (r"(^|\.)visual\.blocks\.\d+\.mlp\.fc1\.(weight|bias)$", Split(0)),
    (r"(^|\.)visual\.blocks\.\d+\.mlp\.fc2\.weight$", Split(1)),
    *_QWEN_VISION_MERGER,
)
_QWEN_VISION_ATTN: Table = (
    # qwen2_5_vl.py Qwen2_5_VisionAttention (also Qwen3-VL's): a
    # QKVParallelLinear over the vision heads, proj row-parallel.
    (r"(^|\.)visual\.blocks\.\d+\.attn\.qkv\.weight$", FusedQKV(0, vision=True)),
    (r"(^|\.)visual\.blocks\.\d+\.attn\.qkv\.bias$", FusedQKV(0, vision=True)),
    (r"(^|\.)visual\.blocks\.\d+\.attn\.proj\.weight$", Split(1)),
)
_QWEN2_5_VL_VISION: Table = (
    *_QWEN_VISION_ATTN,
    # Qwen2_5_VisionMLP: gate/up a MergedColumnParallelLinear, down row.
    (r"(^|\.)visual\.blocks\.\d+\.mlp\.(gate|up)_proj\.(weight|bias)$", Split(0)),
    (r"(^|\.)visual\.blocks\.\d+\.mlp\.down_proj\.weight$", Split(1)),
    *_QWEN_VISION_MERGER,
)
_QWEN3_VL_VISION: Table = (
    *_QWEN_VISION_ATTN,
    # qwen3_vl.py Qwen3_VisionMLP and Qwen3_VisionPatchMerger (merger and
    # deepstack_merger_list): linear_fc1 column-, linear_fc2 row-parallel.
    (
        r"(^|\.)visual\.(blocks|deepstack_merger_list)\.\d+\.(mlp\.)?linear_fc1\.(weight|bias)$",
        Split(0),
    ),
    (r"(^|\.)visual\.(blocks|deepstack_merger_list)\.\d+\.(mlp\.)?linear_fc2\.weight$", Split(1)),
    (r"(^|\.)visual\.merger\.linear_fc1\.(weight|bias)$", Split(0)),
    (r"(^|\.)visual\.merger\.linear_fc2\.weight$", Split(1)),
)
# mllama4.py Llama4MultiModalProjector: linear_1 column-parallel (gathered
# output) even in "data" mode, which only replicates the encoder.
_LLAMA4_PROJECTOR: Table = ((r"(^|\.)multi_modal_projector\.linear_1\.weight$", Split(0)),)
_LLAMA4_VISION: Table = (
    # Llama4VisionAttention: QKVParallelLinear (biases too), o_proj row;
    # Llama4VisionMLP (encoder layers and vision_adapter) fc1 column-, fc2
    # row-parallel; Llama4UnfoldConvolution.linear column-parallel.
    (rf"(^|\.)vision_model\.model{_V}self_attn\.[qkv]_proj\.(weight|bias)$", Heads(vision=True)),
    (rf"(^|\.)vision_model\.model{_V}self_attn\.o_proj\.weight$", Split(1)),
    (
        r"(^|\.)vision_model\.(model\.layers\.\d+|vision_adapter)\.mlp\.fc1\.(weight|bias)$",
        Split(0),
    ),
    (r"(^|\.)vision_model\.(model\.layers\.\d+|vision_adapter)\.mlp\.fc2\.weight$", Split(1)),
    (r"(^|\.)vision_model\.patch_embedding\.linear\.weight$", Split(0)),
    *_LLAMA4_PROJECTOR,
)
#: mm_encoder_tp_mode="weights" per vision family.
VISION_WEIGHTS: Mapping[str, Table] = {
    "generic": _SIGLIP_CLIP_PIXTRAL,  # Gemma 3 (SigLIP), LLaVA, Mistral 3
    "qwen2_vl": _QWEN2_VL_VISION,
    "qwen2_5_vl": _QWEN2_5_VL_VISION,
    "qwen3_vl": _QWEN3_VL_VISION,
    "llama4": _LLAMA4_VISION,
}
#: mm_encoder_tp_mode="data", for the families that support it.
VISION_DATA: Mapping[str, Table] = {
    "qwen2_vl": (),
    "qwen2_5_vl": (),
    "qwen3_vl": (),
    "llama4": _LLAMA4_PROJECTOR,
}
VISION_FAMILIES: Mapping[str, str] = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    **dict.fromkeys(("qwen3_vl", "qwen3_vl_moe"), "qwen3_vl"),
    "llama4": "llama4",
}
# What no vision rule claims stays whole: the text rules must not reach the
# encoder, whose head counts are not the text model's.
VISION: Table = (
    (
        r"(^|\.)(vision_tower|vision_model|visual|multi_modal_projector|mm_projector)\.",
        Replicate(),
    ),
)


__all__ = ["VISION", "VISION_DATA", "VISION_FAMILIES", "VISION_WEIGHTS"]
