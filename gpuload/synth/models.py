"""Decoder-only transformer architectures: :class:`ModelSpec` and :data:`PRESETS`.

Tensor names and shapes are the ones transformers uses for Llama, Mixtral,
Qwen2-MoE and Phi-3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from gpuload.format.dtypes import DTYPES


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown {dtype=}; known: {', '.join(DTYPES)}")


Family = Literal["llama", "mixtral", "qwen2_moe", "phi3"]
_ARCH = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Dimensions of one decoder-only transformer, named as in HF configs.

    ``intermediate`` is the dense MLP width (llama, phi3), the per-expert width
    for mixtral, and the (unused) dense width for qwen2_moe, whose experts are
    ``moe_intermediate`` wide beside a ``shared_intermediate`` shared expert.
    """

    family: Family
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    tied_embeddings: bool = False
    experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0

    def __post_init__(self) -> None:
        if self.family not in _ARCH:
            raise ValueError(f"family={self.family!r} is not one of {', '.join(_ARCH)}")
        for f in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "layers"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f}={v!r} must be a positive int")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        if self.family in ("qwen2_moe", "phi3") and self.heads * self.head_dim != self.hidden:
            raise ValueError(
                f"{self.family} needs heads x head_dim == hidden, got "
                f"{self.heads} x {self.head_dim} != {self.hidden}"
            )
        moe = self.family in ("mixtral", "qwen2_moe")
        if moe and not (1 <= self.experts_per_tok <= self.experts):
            raise ValueError(
                f"{self.family} needs 1 <= experts_per_tok <= experts, got "
                f"{self.experts_per_tok=}, {self.experts=}"
            )
        if not moe and self.experts:
            raise ValueError(f"{self.family} has no experts, got {self.experts=}")
        if self.family == "qwen2_moe" and min(self.moe_intermediate, self.shared_intermediate) < 1:
            raise ValueError("qwen2_moe needs moe_intermediate and shared_intermediate >= 1")

    # ---- tensors

    def global_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensors outside the decoder layers, in state-dict order."""
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        out.append(("model.norm.weight", (self.hidden,)))
        if not self.tied_embeddings:
            out.append(("lm_head.weight", (self.vocab, self.hidden)))
        return out

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        """Tensors of decoder layer ``i``, in state-dict order."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        p = f"model.layers.{i}."
        out: list[tuple[str, tuple[int, ...]]] = []
        if self.family == "phi3":
            out.append((p + "self_attn.qkv_proj.weight", (q + 2 * kv, h)))
        else:
            for n, rows in (("q", q), ("k", kv), ("v", kv)):
                out.append((p + f"self_attn.{n}_proj.weight", (rows, h)))
                if self.family == "qwen2_moe":  # Qwen2 attention has q/k/v biases
                    out.append((p + f"self_attn.{n}_proj.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (h, q)))
        inter = self.intermediate
        if self.family == "llama":
            for n in ("gate", "up"):
                out.append((p + f"mlp.{n}_proj.weight", (inter, h)))
            out.append((p + "mlp.down_proj.weight", (h, inter)))
        elif self.family == "phi3":
            out.append((p + "mlp.gate_up_proj.weight", (2 * inter, h)))
            out.append((p + "mlp.down_proj.weight", (h, inter)))
        elif self.family == "mixtral":
            m = p + "block_sparse_moe."
            out.append((m + "gate.weight", (self.experts, h)))
            for e in range(self.experts):
                out.append((m + f"experts.{e}.w1.weight", (inter, h)))
                out.append((m + f"experts.{e}.w2.weight", (h, inter)))
                out.append((m + f"experts.{e}.w3.weight", (inter, h)))
        else:  # qwen2_moe
            m = p + "mlp."
            out.append((m + "gate.weight", (self.experts, h)))
            blocks = [(f"experts.{e}.", self.moe_intermediate) for e in range(self.experts)]
            for prefix, w in [*blocks, ("shared_expert.", self.shared_intermediate)]:
                out.append((m + prefix + "gate_proj.weight", (w, h)))
                out.append((m + prefix + "up_proj.weight", (w, h)))
                out.append((m + prefix + "down_proj.weight", (h, w)))
            out.append((m + "shared_expert_gate.weight", (1, h)))
        out.append((p + "input_layernorm.weight", (h,)))
        out.append((p + "post_attention_layernorm.weight", (h,)))
        return out

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor ``(name, shape)`` in HF state-dict (layer) order."""
        g = self.global_tensors()
        layers = [t for i in range(self.layers) for t in self.layer_tensors(i)]
        return [g[0], *layers, *g[1:]]

    def nbytes(self, dtype: str = "BF16") -> int:
        """Total tensor bytes in ``dtype`` (what index.json calls total_size)."""
        bits = DTYPES[dtype].bits

        def size(ts: list[tuple[str, tuple[int, ...]]]) -> int:
            return sum(math.prod(s) for _, s in ts) * bits // 8

        return size(self.global_tensors()) + self.layers * size(self.layer_tensors(0))

    def config(self, dtype: str = "BF16") -> dict[str, Any]:
        """The ``config.json`` transformers would write for this model."""
        dt = DTYPES[dtype]
        cfg: dict[str, Any] = {
            "architectures": [_ARCH[self.family]],
            "model_type": self.family,
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_hidden_layers": self.layers,
            "tie_word_embeddings": self.tied_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
            "rope_theta": 10000.0,
            "torch_dtype": dt.torch or dt.name.lower(),
        }
        if self.family == "mixtral":
            cfg["num_local_experts"] = self.experts
            cfg["num_experts_per_tok"] = self.experts_per_tok
        elif self.family == "qwen2_moe":
            cfg["num_experts"] = self.experts
            cfg["num_experts_per_tok"] = self.experts_per_tok
            cfg["moe_intermediate_size"] = self.moe_intermediate
            cfg["shared_expert_intermediate_size"] = self.shared_intermediate
            cfg["decoder_sparse_step"] = 1
            cfg["mlp_only_layers"] = []
            cfg["norm_topk_prob"] = False
        return cfg


def _preset(family: Family, dims: str, **moe: int) -> ModelSpec:
    """``dims``: hidden heads kv_heads head_dim intermediate vocab layers."""
    return ModelSpec(family, *map(int, dims.split()), **moe)  # type: ignore[arg-type]


PRESETS: dict[str, ModelSpec] = {
    # Full-size templates with published shapes; resize them with scale_spec.
    "llama": _preset("llama", "4096 32 8 128 14336 128256 32"),  # Llama-3-8B
    "mixtral": _preset(  # Mixtral-8x7B
        "mixtral", "4096 32 8 128 14336 32000 32", experts=8, experts_per_tok=2
    ),
    "qwen-moe": _preset(  # Qwen1.5-MoE-A2.7B
        "qwen2_moe",
        "2048 16 16 128 5632 151936 24",
        experts=60,
        experts_per_tok=4,
        moe_intermediate=1408,
        shared_intermediate=5632,
    ),
    "phi3": _preset("phi3", "3072 32 32 96 8192 32064 32"),  # Phi-3-mini
    # A few hundred KiB in BF16, for unit tests and the demo. kv_heads 4 < 8:
    # world 8 replicates KV heads; 6 experts do not split evenly over 4 ranks.
    "tiny": _preset("llama", "64 8 4 8 256 512 2"),
    "tiny-mixtral": _preset("mixtral", "64 8 4 8 128 512 2", experts=4, experts_per_tok=2),
    "tiny-qwen-moe": _preset(
        "qwen2_moe",
        "64 8 8 8 256 512 2",
        experts=6,
        experts_per_tok=2,
        moe_intermediate=32,
        shared_intermediate=128,
    ),
    "tiny-phi3": _preset("phi3", "64 8 4 8 256 512 2"),
}


def get_spec(spec_or_preset: str | ModelSpec) -> ModelSpec:
    """A :class:`ModelSpec` as is, or the preset of that name."""
    if isinstance(spec_or_preset, ModelSpec):
        return spec_or_preset
    try:
        return PRESETS[spec_or_preset]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown preset {spec_or_preset!r}; known: {', '.join(PRESETS)}"
        ) from None
