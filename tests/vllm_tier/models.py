"""Tiny random checkpoints for the vLLM tier, written by transformers.

Each family is a real transformers model saved with ``save_pretrained`` into
several files and an index, in bfloat16 (what vLLM runs here). Sizes: hidden
128, 4 query heads of 32 (vLLM's CPU attention fails at head_dim 16), 2 kv
heads, 2 layers. A vocabulary of 130 pads to 192 rows (vLLM's multiple of
64): at TP=2 the second rank holds 34 real rows of its 96.
"""

from __future__ import annotations

import warnings
from pathlib import Path

COMMON = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=130,
    max_position_embeddings=256,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
FAMILIES = {
    # GQA, q/k/v (and o) biases
    "llama": ("LlamaConfig", {"attention_bias": True}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),  # q/k/v biases, tied
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # q_norm / k_norm
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj, gate_up_proj in the checkpoint
}


def write_model(family: str, where: Path) -> Path:
    """A random ``family`` model saved by transformers into several files."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        cls, extra = FAMILIES[family]
        config = getattr(transformers, cls)(**{**COMMON, **extra})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        # transformers starts biases at 0 and norms at 1: a loader that
        # dropped them, or took another rank's, would still match.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
        model.save_pretrained(where, max_shard_size="200KB")
    assert len(list(where.glob("*.safetensors"))) > 1, where
    assert (where / "model.safetensors.index.json").is_file()
    return where
