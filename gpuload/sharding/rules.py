"""Sharding rules as data: the spec types and the built-in tables per family.

A spec says how one tensor splits over tensor-parallel ranks (vLLM's
semantics); a table is an ordered ``(regex, spec)`` list, searched with
``re.search``, first match wins. :class:`gpuload.sharding.sharder.Sharder` applies
them. Stacked MoE expert tensors (one tensor for all experts, e.g.
``mlp.experts.gate_up_proj`` or vLLM's ``w13``) are laid out ``[E, out, in]``
(experts on dim 0, output features on dim 1), except in the families vLLM
loads transposed, ``[E, in, out]`` (Llama 4, Qwen3-VL-MoE).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Replicate:
    """Every rank takes the whole tensor."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Split ``dim`` (negative counts from the end) evenly over the ranks.

    ``sections`` fuses tensors along ``dim``: a count of equal sections or a
    tuple of sizes. Each section is split on its own and the rank's parts sit
    side by side: a fused ``gate_up`` is ``Split(0, sections=2)``.
    """

    dim: int
    sections: int | tuple[int, ...] = 1

    def __post_init__(self) -> None:
        s = self.sections
        if isinstance(s, int) and s < 1 or isinstance(s, tuple) and (not s or min(s) < 1):
            raise ValueError(f"sections={s!r} has to be a count >= 1 or positive sizes")


@dataclasses.dataclass(frozen=True)
class Heads:
    """Split dim 0 by whole attention heads; ``kv=True`` counts key/value heads,
    each replicated on ``world // kv_heads`` consecutive ranks when the world
    is larger (vLLM's QKVParallelLinear). ``vision=True`` counts the vision
    encoder's heads (``vision_config``), which are also its kv heads."""

    kv: bool = False
    vision: bool = False


@dataclasses.dataclass(frozen=True)
class FusedQKV:
    """A fused q | k | v tensor along ``dim``, each section split by heads
    (``vision=True``: the vision encoder's, q and kv alike)."""

    dim: int = 0
    vision: bool = False


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Dim 0 over the vocabulary as vLLM's VocabParallelEmbedding: padded to a
    multiple of ``pad_to``, ``padded // world`` rows a rank, so the last ranks
    hold the padding and get fewer real rows. ``pad_to=1``: a plain split.
    With ``allow_uneven``, ``ceil(padded / world)`` rows a rank."""

    pad_to: int = 64


@dataclasses.dataclass(frozen=True)
class ConfigSections:
    """``Split(dim, sections=sizes)`` with each section's size the product of
    config.json values: ``(("a", "b"), ("c",))`` is sections ``a*b`` and ``c``."""

    dim: int
    sections: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True)
class Intermediate:
    """gpt-oss experts: ``dim`` holds the intermediate size ``I`` as
    ``entries`` per ``block`` elements. A rank owns elements ``[r * per,
    min((r + 1) * per, I))`` with ``per = ceil(I / block / world) * block``,
    uneven by design (vLLM gpt_oss.py ``_load_weights_mxfp4``: 32-element
    MXFP4 blocks; ``_load_weights_other``: block 1)."""

    dim: int
    entries: int = 1
    block: int = 1


@dataclasses.dataclass(frozen=True)
class FirstRank:
    """Rank 0 takes the whole tensor; the others none of it (vLLM loads it
    on rank 0 and zeroes it elsewhere, so a sum over ranks adds it once)."""


@dataclasses.dataclass(frozen=True)
class Expert:
    """A MoE expert tensor: ``inner`` under tensor parallelism, whole experts
    under expert parallelism. ``stacked=False``: one expert, its index read
    from ``experts.<e>.`` in the name. ``stacked=True``: all experts in one
    ``[E, out, in]`` (or transposed ``[E, in, out]``) tensor that ``inner``
    indexes; expert parallelism takes a dim-0 block of it."""

    inner: Replicate | Split | Heads | FusedQKV | Vocab | ConfigSections | Intermediate | FirstRank
    stacked: bool = False
    #: The dim of a stacked tensor that holds ``hidden_size``: a tensor whose
    #: dim differs (config.json known) is in the other layout and raises.
    hidden: int | None = None


Spec = (
    Replicate
    | Split
    | Heads
    | FusedQKV
    | Vocab
    | ConfigSections
    | Intermediate
    | FirstRank
    | Expert
)
Table = tuple[tuple[str, Spec], ...]

# ---------------------------------------------------------------------------
# Built-in rule tables. Ordered; first match wins. Patterns are re.search'd.
# A pattern may match indices (\d+) but never a particular layer, block or
# expert (``layers.<i>``, ``blocks.<i>``, ``experts.<i>``, ``h.<i>``): the
# Sharder remembers a match for every name that differs only in those.
# ---------------------------------------------------------------------------

_EMBED: Table = (
    (r"(^|\.)embed_tokens\.weight$", Vocab()),
    # ParallelLMHead's bias (PhiMoE) loads with the weight's vocab split.
    (r"(^|\.)lm_head\.(weight|bias)$", Vocab()),
)
_ATTN: Table = (
    (r"\.self_attn\.q_proj\.(weight|bias)$", Heads()),
    (r"\.self_attn\.[kv]_proj\.(weight|bias)$", Heads(kv=True)),
    (r"\.self_attn\.o_proj\.weight$", Split(1)),
    (r"\.self_attn\.o_proj\.bias$", Replicate()),
)
_MLP: Table = (
    (r"\.mlp\.(gate|up)_proj\.(weight|bias)$", Split(0)),
    (r"\.mlp\.down_proj\.weight$", Split(1)),
    (r"\.mlp\.down_proj\.bias$", Replicate()),
)
_NORMS: Table = ((r"(norm|(^|\.)ln_\w+)\.(weight|bias)$", Replicate()),)
_PHI3: Table = (
    (r"\.self_attn\.qkv_proj\.(weight|bias)$", FusedQKV()),
    (r"\.mlp\.gate_up_proj\.(weight|bias)$", Split(0, sections=2)),
)
_MIXTRAL_MOE: Table = (
    (r"\.block_sparse_moe\.gate\.weight$", Replicate()),
    # compressed-tensors exports name them gate/up/down_proj: vLLM mixtral.py
    # MixtralModel.hf_to_vllm_mapper maps them to w1/w3/w2.
    (
        r"\.block_sparse_moe\.experts\.\d+\.(w[13]|gate_proj|up_proj)\.weight$",
        Expert(Split(0)),
    ),
    (r"\.block_sparse_moe\.experts\.\d+\.(w2|down_proj)\.weight$", Expert(Split(1))),
)
_ROUTED_EXPERTS: Table = (  # Qwen-MoE and DeepSeek name them alike
    (r"\.mlp\.experts\.\d+\.(gate|up)_proj\.weight$", Expert(Split(0))),
    (r"\.mlp\.experts\.\d+\.down_proj\.weight$", Expert(Split(1))),
    (r"\.mlp\.gate\.weight$", Replicate()),
)
_STACKED_EXPERTS: Table = (  # [E, out, in]
    (r"\.experts\.(gate_up_proj|w13)(_weight|\.weight)?$", Expert(Split(1, 2), stacked=True)),
    (r"\.experts\.(gate_proj|up_proj|w1|w3)(_weight|\.weight)?$", Expert(Split(1), stacked=True)),
    (r"\.experts\.(down_proj|w2)(_weight|\.weight)?$", Expert(Split(2), stacked=True)),
)
# Transposed stacked experts, [E, in, out]: gate_up_proj [E, H, 2I] (gate | up
# along dim 2), down_proj [E, I, H]. vLLM transposes them to [E, out, in]
# before its usual split: llama4.py Llama4Model.load_moe_expert_weights
# (transpose(-1, -2), then chunk(2, dim=-2)) and, for Qwen3-VL-MoE,
# fused_moe/routed_experts.py _orient_fused_weight under
# is_fused_checkpoint_transposed. So gate_up splits dim 2 per section and
# down_proj dim 1; expert parallelism takes dim-0 blocks. transformers 5 saves
# Qwen3-VL-MoE untransposed ([E, out, in]), which vLLM 0.33 cannot load: where
# hidden_size tells the layouts apart, that raises rather than misloads.
_TRANSPOSED_EXPERTS: Table = (
    (r"\.mlp\.experts\.gate_up_proj$", Expert(Split(2, sections=2), True, hidden=1)),
    (r"\.mlp\.experts\.down_proj$", Expert(Split(1), True, hidden=2)),
)
# vLLM llama4.py Llama4MoE: a GateLinear router (whole), the routed experts
# transposed as above, and shared_expert a LlamaMLP (gate/up column-, down
# row-parallel, also under expert parallelism). Dense layers between MoE
# layers are a LlamaMLP named feed_forward.
_LLAMA4: Table = (
    (r"\.feed_forward\.router\.weight$", Replicate()),
    (r"\.feed_forward\.experts\.gate_up_proj$", Expert(Split(2, sections=2), True, hidden=1)),
    (r"\.feed_forward\.experts\.down_proj$", Expert(Split(1), True, hidden=2)),
    (r"\.feed_forward\.(shared_expert\.)?(gate|up)_proj\.weight$", Split(0)),
    (r"\.feed_forward\.(shared_expert\.)?down_proj\.weight$", Split(1)),
)
# vLLM gpt_oss.py GptOssModel: attention sinks split by head (make_attention_sink
# over num_heads // tp), the router (GateLinear) whole. Experts are sliced by
# hand: gate_up rows interleave gate and up, so a rank's intermediate range
# [s, e) is entries [2s, 2e); down_proj_bias is loaded on rank 0 only. Under
# expert parallelism, dim-0 blocks of E / world experts.
_GPT_OSS_COMMON: Table = (
    (r"\.self_attn\.sinks$", Heads()),
    (r"\.mlp\.router\.(weight|bias)$", Replicate()),
    (r"\.mlp\.experts\.down_proj_bias$", Expert(FirstRank(), stacked=True)),
)
_GPT_OSS: Table = (  # _load_weights_other: [E, H, 2I], [E, I, H], per = ceil(I / w)
    *_GPT_OSS_COMMON,
    (r"\.mlp\.experts\.gate_up_proj$", Expert(Intermediate(2, entries=2), stacked=True)),
    (r"\.mlp\.experts\.gate_up_proj_bias$", Expert(Intermediate(1, entries=2), stacked=True)),
    (r"\.mlp\.experts\.down_proj$", Expert(Intermediate(1), stacked=True)),
)
_GPT_OSS_MXFP4: Table = (  # _load_weights_mxfp4: whole 32-element blocks a rank
    *_GPT_OSS_COMMON,
    # gate_up_proj_blocks [E, 2I, H/32, 16], _scales [E, 2I, H/32], _bias [E, 2I]
    (
        r"\.mlp\.experts\.gate_up_proj_(blocks|scales|bias)$",
        Expert(Intermediate(1, entries=64, block=32), stacked=True),
    ),
    # down_proj_blocks [E, H, I/32, 16], _scales [E, H, I/32]
    (
        r"\.mlp\.experts\.down_proj_(blocks|scales)$",
        Expert(Intermediate(2, entries=1, block=32), stacked=True),
    ),
)
# vLLM qwen3_next.py / layers/mamba/gdn/qwen_gdn_linear_attn.py
# (gqa_interleaved_layout=True): in_proj_qkvz and in_proj_ba are one output
# section each, so an even dim-0 split (whole key-head groups);
# conv1d's mamba_v2_sharded_weight_loader splits q | k | v (key_dim, key_dim,
# value_dim) each on its own; A_log and dt_bias by value head; out_proj
# row-parallel. Full-attention q_proj holds q and its output gate per head.
_KEY_DIM = ("linear_num_key_heads", "linear_key_head_dim")
_VALUE_DIM = ("linear_num_value_heads", "linear_value_head_dim")
_QWEN3_NEXT: Table = (
    (r"\.linear_attn\.in_proj_(qkvz|ba)\.weight$", Split(0)),
    (r"\.linear_attn\.conv1d\.weight$", ConfigSections(0, (_KEY_DIM, _KEY_DIM, _VALUE_DIM))),
    (r"\.linear_attn\.(A_log|dt_bias)$", Split(0)),
    (r"\.linear_attn\.out_proj\.weight$", Split(1)),
)
_QWEN_SHARED: Table = (
    (r"\.mlp\.shared_expert\.(gate|up)_proj\.weight$", Split(0)),
    (r"\.mlp\.shared_expert\.down_proj\.weight$", Split(1)),
    (r"\.mlp\.shared_expert_gate\.weight$", Replicate()),
)
_DEEPSEEK: Table = (
    (r"\.self_attn\.q_b_proj\.weight$", Heads()),
    (r"\.self_attn\.kv_b_proj\.weight$", Heads()),  # MLA: split by query heads
    (r"\.self_attn\.(q_a_proj|kv_a_proj_with_mqa)\.weight$", Replicate()),
    (r"\.mlp\.shared_experts\.(gate|up)_proj\.weight$", Split(0)),
    (r"\.mlp\.shared_experts\.down_proj\.weight$", Split(1)),
    (r"\.mlp\.gate\.e_score_correction_bias$", Replicate()),
    (r"\.shared_head\.head\.weight$", Vocab()),  # V3 multi-token-prediction head
)
_GPT2: Table = (  # Conv1D weights are stored [in, out]
    (r"(^|\.)wte\.weight$", Vocab()),
    (r"(^|\.)wpe\.weight$", Replicate()),
    # vLLM gpt2.py GPT2Attention: a QKVParallelLinear over n_head heads that
    # asserts total_num_heads % tp == 0, so c_attn splits by whole heads.
    (r"\.attn\.c_attn\.weight$", FusedQKV(dim=1)),
    (r"\.attn\.c_attn\.bias$", FusedQKV(dim=0)),
    (r"\.(attn|mlp)\.c_proj\.weight$", Split(0)),
    (r"\.(attn|mlp)\.c_proj\.bias$", Replicate()),
    (r"\.mlp\.c_fc\.weight$", Split(1)),
    (r"\.mlp\.c_fc\.bias$", Split(0)),
    (r"\.attn\.(masked_)?bias$", Replicate()),  # old causal-mask buffers
)


def _union(*tables: Table) -> Table:
    """Every rule of ``tables`` once, in order; a pattern the families map to
    different specs is left out, so no family's choice wins by accident."""
    specs: dict[str, set[Spec]] = {}
    for table in tables:
        for pattern, spec in table:
            specs.setdefault(pattern, set()).add(spec)
    return tuple((p, next(iter(s))) for p, s in specs.items() if len(s) == 1)


_LLAMA = _EMBED + _ATTN + _MLP + _NORMS
_MOE_ATTN = _EMBED + _ATTN
_FAMILIES: Mapping[str, Table] = {
    "llama": _LLAMA,  # also Mistral, Qwen2, Qwen3, Gemma 1-3
    "phi3": _EMBED + _PHI3 + _ATTN + _MLP + _NORMS,
    "mixtral": _MOE_ATTN + _MIXTRAL_MOE + _STACKED_EXPERTS + _NORMS,
    "qwen_moe": _MOE_ATTN + _ROUTED_EXPERTS + _QWEN_SHARED + _MLP + _STACKED_EXPERTS + _NORMS,
    "deepseek": _MOE_ATTN + _DEEPSEEK + _ROUTED_EXPERTS + _MLP + _STACKED_EXPERTS + _NORMS,
    "gpt2": _GPT2 + _NORMS,
    "llama4": _EMBED + _ATTN + _LLAMA4 + _NORMS,
    "qwen3_vl_moe": _MOE_ATTN + _TRANSPOSED_EXPERTS + _ROUTED_EXPERTS + _MLP + _NORMS,
    "gpt_oss": _EMBED + _ATTN + _GPT_OSS + _NORMS,
    "qwen3_next": _MOE_ATTN + _QWEN3_NEXT + _ROUTED_EXPERTS + _QWEN_SHARED + _MLP + _NORMS,
    "gpt_oss_mxfp4": _EMBED + _ATTN + _GPT_OSS_MXFP4 + _NORMS,
}
RULE_TABLES: Mapping[str, Table] = {
    **_FAMILIES,
    "generic": _union(*_FAMILIES.values()),  # unknown or missing model_type
}
MODEL_TYPES: Mapping[str, str] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3"), "llama"),
    **dict.fromkeys(("gemma", "gemma2", "gemma3_text"), "llama"),
    "phi3": "phi3",
    "mixtral": "mixtral",
    **dict.fromkeys(("qwen2_moe", "qwen3_moe"), "qwen_moe"),
    **dict.fromkeys(("deepseek_v2", "deepseek_v3"), "deepseek"),
    "gpt2": "gpt2",
    # Multimodal checkpoints whose text model is flat in config.json; others
    # (gemma3, llava, mistral3) name theirs in text_config.model_type.
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_text"), "llama"),
    **dict.fromkeys(("llama4", "llama4_text"), "llama4"),
    **dict.fromkeys(("qwen3_vl_moe", "qwen3_vl_moe_text"), "qwen3_vl_moe"),
    "gpt_oss": "gpt_oss",
    "qwen3_next": "qwen3_next",
    # vLLM glm4_moe.py Glm4MoE: DeepSeek's names and splits (gate with
    # e_score_correction_bias whole, routed experts, shared_experts a
    # tensor-parallel MLP also under EP) with a plain QKV attention.
    "glm4_moe": "deepseek",
    # vLLM phimoe.py: Mixtral's block_sparse_moe experts (w1/w2/w3), biased
    # attention and an lm_head bias.
    "phimoe": "mixtral",
}
#: (family, quantization_config.quant_method) -> the family's table for it.
QUANT_FAMILIES: Mapping[tuple[str, str], str] = {("gpt_oss", "mxfp4"): "gpt_oss_mxfp4"}


__all__ = [
    "MODEL_TYPES",
    "RULE_TABLES",
    "ConfigSections",
    "Expert",
    "FirstRank",
    "FusedQKV",
    "Heads",
    "Intermediate",
    "QUANT_FAMILIES",
    "Replicate",
    "Spec",
    "Split",
    "Table",
    "Vocab",
]
