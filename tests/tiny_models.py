"""Tiny random models written by ``transformers``, and its greedy generation.

The examples are judged against transformers itself: a checkpoint it wrote
(several files and an index), and the ids its ``generate`` picks greedily
in float32 on the same weights.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [1, 2, 3, 4]
NEW_TOKENS = 6

# Shared sizes: hidden 64, 4 query heads of 16, 2 layers. A vocabulary of 130
# pads to 192 rows (vLLM's multiple of 64): at world 4 the last rank holds
# no real row, at world 2 the second holds 34 of 96.
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=130,
    max_position_embeddings=64,
    # Larger than the default 0.02, so greedy picks win by clear margins
    # (checked in reference()): float32 sums in another order must not flip one.
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}),  # q_norm/k_norm
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj, gate_up_proj
}


@contextlib.contextmanager
def quiet():
    """transformers' own deprecation and generation warnings are not ours
    (pytest turns warnings into errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def write_model(family: str, where: Path) -> Path:
    """A random ``family`` model saved by transformers into several files."""
    import torch

    with quiet():
        import transformers

        cls, extra = FAMILIES[family]
        config = getattr(transformers, cls)(**{**COMMON, **extra})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # transformers starts biases at 0 and norms at 1: a model that dropped
        # them, or took another rank's, would still match. Random ones do not.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
        model.save_pretrained(where, max_shard_size="40KB")
    assert len(list(where.glob("*.safetensors"))) > 1
    assert (where / "model.safetensors.index.json").is_file()
    return where


def reference(model_dir: Path, prompt=PROMPT, new_tokens=NEW_TOKENS) -> list[int]:
    """transformers' greedy ids (new tokens only), float32, no stop at EOS."""
    import torch

    with quiet():
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        out = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    # Each step's winner must beat the runner-up clearly, else a correct
    # sharded model could pick differently by rounding alone.
    for step in out.scores:
        top2 = step[0].topk(2).values
        assert top2[0] - top2[1] > 1e-3, f"{model_dir.name}: a near tie {top2.tolist()}"
    return out.sequences[0, len(prompt) :].tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, world: int, *args: str, timeout: float = 240) -> list[int]:
    """Run ``examples/<script>`` on ``world`` CPU ranks (gloo, 127.0.0.1) and
    return the JSON list rank 0 printed on its last line."""
    import json

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(ROOT / "examples" / script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    lines = proc.stdout.strip().splitlines()
    ids = json.loads(lines[-1])
    # Rank 0 alone prints the list.
    assert sum(line.startswith("[") for line in lines) == 1, proc.stdout
    return ids
