"""Tensor-parallel greedy generation from gpuload's shards, Megatron style.

    torchrun --nproc-per-node W examples/tp_generate.py MODEL_DIR \\
        --prompt-ids 1,2,3 --max-new-tokens 16 [--device cpu|cuda] [--dtype float32]

Each rank calls ``gpuload.load_sharded(MODEL_DIR, rank, W, device=...)`` once
and runs a decoder built from nothing but its own shards: column-parallel
q/k/v and gate/up (Phi-3's fused ``qkv_proj``/``gate_up_proj`` too),
row-parallel o_proj/down_proj whose partial sums are all-reduced (their
biases added once, after the reduction), a vocab-parallel embedding and
lm_head (vLLM's 64-row padding, so the last ranks hold fewer real rows or
none; tied embeddings reuse the embedding shard), GQA with kv heads
replicated when W exceeds them, Qwen3's q_norm/k_norm, and Mixtral experts
split by tensor parallelism with the router replicated.

Families: Llama, Mistral, Qwen2, Qwen3, Mixtral, Phi-3 (``model_type`` in
config.json). gloo on the CPU, NCCL on a GPU. Decoding is greedy, exactly
``--max-new-tokens`` tokens, no stop at EOS, no KV cache (every step reruns
the sequence: the point is the shards, not speed). Rank 0 prints the new
token ids as a JSON list on its last line of standard output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gpuload

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "phi3")
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
VOCAB_PAD = 64  # vLLM pads the vocabulary to a multiple of 64 rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = p.parse_args(argv)
    args.prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    if not args.prompt or args.max_new_tokens < 0:
        p.error("need at least one prompt id and --max-new-tokens >= 0")
    return args


def init(device: str) -> tuple[int, int, str]:
    """The process group (gloo or NCCL); each GPU rank on its local device."""
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class Config:
    """What the decoder needs from config.json, with transformers' defaults."""

    def __init__(self, raw: dict) -> None:
        self.type = raw.get("model_type")
        if self.type not in FAMILIES:
            raise SystemExit(f"model_type={self.type!r} is not one of {', '.join(FAMILIES)}")
        self.hidden = raw["hidden_size"]
        self.layers = raw["num_hidden_layers"]
        self.heads = raw["num_attention_heads"]
        self.kv_heads = raw.get("num_key_value_heads") or self.heads
        self.head_dim = raw.get("head_dim") or self.hidden // self.heads
        self.vocab = raw["vocab_size"]
        self.eps = raw.get("rms_norm_eps", 1e-6)
        self.act = ACTIVATIONS[raw.get("hidden_act", "silu")]
        self.tied = bool(raw.get("tie_word_embeddings", False))
        self.experts = raw.get("num_local_experts")
        self.top_k = raw.get("num_experts_per_tok")
        self.sliding_window = raw.get("sliding_window")
        # transformers 5 writes rope_parameters; 4.x wrote rope_theta/rope_scaling.
        rope = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
        if rope_type not in (None, "default"):
            raise SystemExit(f"rope_type={rope_type!r}: this example does default rotary only")
        self.theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        factor = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        self.rotary_dim = int(self.head_dim * factor)


class Shards:
    """This rank's tensors, checked against the sizes tensor parallelism implies."""

    def __init__(self, tensors: dict, cfg: Config, rank: int, world: int, dtype) -> None:
        self.t = {k: v.to(dtype) for k, v in tensors.items()}
        self.cfg, self.rank, self.world = cfg, rank, world
        self.q_heads = cfg.heads // world
        # GQA: with more ranks than kv heads each rank keeps one (replicated) kv head.
        self.kv_heads = max(1, cfg.kv_heads // world)
        padded = -(-cfg.vocab // VOCAB_PAD) * VOCAB_PAD
        self.vocab_per = padded // world
        self.vocab_start = min(cfg.vocab, rank * self.vocab_per)
        self.vocab_rows = min(cfg.vocab, self.vocab_start + self.vocab_per) - self.vocab_start
        self.embed = self.get("model.embed_tokens.weight", self.vocab_rows, cfg.hidden)
        head = self.t.get("lm_head.weight")
        self.lm_head = self.embed if head is None and cfg.tied else head
        if self.lm_head is None:
            raise SystemExit("no lm_head.weight and tie_word_embeddings is false")

    def get(self, name: str, *shape: int) -> torch.Tensor:
        """A tensor, which must have the shape this rank's shard should have."""
        t = self.t[name]
        if tuple(t.shape) != shape:
            raise SystemExit(f"rank {self.rank}: {name} has shape {tuple(t.shape)}, want {shape}")
        return t

    def maybe(self, name: str, *shape: int) -> torch.Tensor | None:
        return self.get(name, *shape) if name in self.t else None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return w * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)


def rotary(cfg: Config, n: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    dim = cfg.rotary_dim
    inv_freq = 1.0 / cfg.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, T, head_dim]; rotates the first ``cos.shape[-1]`` features."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = rot.shape[-1] // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, b)


def attention(s: Shards, i: int, h: torch.Tensor, cos, sin) -> torch.Tensor:
    cfg, p = s.cfg, f"model.layers.{i}.self_attn."
    hd, nq, nkv, n = cfg.head_dim, s.q_heads, s.kv_heads, h.shape[0]
    if cfg.type == "phi3":  # fused q | k | v: gpuload puts this rank's parts side by side
        qkv = linear(h, s.get(p + "qkv_proj.weight", (nq + 2 * nkv) * hd, cfg.hidden))
        q, k, v = qkv.split((nq * hd, nkv * hd, nkv * hd), dim=-1)
    else:
        q = linear(
            h, s.get(p + "q_proj.weight", nq * hd, cfg.hidden), s.maybe(p + "q_proj.bias", nq * hd)
        )
        k = linear(
            h,
            s.get(p + "k_proj.weight", nkv * hd, cfg.hidden),
            s.maybe(p + "k_proj.bias", nkv * hd),
        )
        v = linear(
            h,
            s.get(p + "v_proj.weight", nkv * hd, cfg.hidden),
            s.maybe(p + "v_proj.bias", nkv * hd),
        )
    q, k, v = (t.view(n, -1, hd).transpose(0, 1) for t in (q, k, v))  # [heads, T, hd]
    if cfg.type == "qwen3":  # per-head RMSNorm before rotary; weights replicated
        q = rms_norm(q, s.get(p + "q_norm.weight", hd), cfg.eps)
        k = rms_norm(k, s.get(p + "k_norm.weight", hd), cfg.eps)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k, v = (t.repeat_interleave(nq // nkv, dim=0) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    mask = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
    if cfg.sliding_window is not None and n > cfg.sliding_window:
        raise SystemExit("the sequence is longer than the sliding window: not supported here")
    scores = scores.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32)
    out = (scores.to(v.dtype) @ v).transpose(0, 1).reshape(n, nq * hd)
    # Row-parallel o_proj: each rank holds the columns of its own heads.
    out = all_reduce(linear(out, s.get(p + "o_proj.weight", cfg.hidden, nq * hd)))
    bias = s.maybe(p + "o_proj.bias", cfg.hidden)
    return out if bias is None else out + bias  # once, after the reduction


def mlp(s: Shards, prefix: str, h: torch.Tensor, inter: int, fused: bool) -> torch.Tensor:
    """This rank's partial sum of a gated MLP (column-parallel up, row-parallel down)."""
    cfg = s.cfg
    if fused:  # Phi-3 gate_up_proj: this rank's gate part, then its up part
        gate, up = linear(h, s.get(prefix + "gate_up_proj.weight", 2 * inter, cfg.hidden)).chunk(
            2, -1
        )
        return linear(cfg.act(gate) * up, s.get(prefix + "down_proj.weight", cfg.hidden, inter))
    gate = linear(h, s.get(prefix + "gate_proj.weight", inter, cfg.hidden))
    up = linear(h, s.get(prefix + "up_proj.weight", inter, cfg.hidden))
    return linear(cfg.act(gate) * up, s.get(prefix + "down_proj.weight", cfg.hidden, inter))


def moe(s: Shards, i: int, h: torch.Tensor) -> torch.Tensor:
    """Mixtral: the replicated router picks experts; each expert is TP-split
    (w1/w3 by rows, w2 by columns), so one all-reduce sums every expert."""
    cfg, p = s.cfg, f"model.layers.{i}.block_sparse_moe."
    logits = linear(h, s.get(p + "gate.weight", cfg.experts, cfg.hidden))
    probs = logits.float().softmax(-1)
    top, idx = probs.topk(cfg.top_k, dim=-1)
    top = (top / top.sum(-1, keepdim=True)).to(h.dtype)
    out = torch.zeros_like(h)
    inter = s.t[p + "experts.0.w1.weight"].shape[0]
    for e in range(cfg.experts):
        tokens, slot = torch.where(idx == e)
        if tokens.numel() == 0:
            continue
        x = h[tokens]
        w = f"{p}experts.{e}."
        y = cfg.act(linear(x, s.get(w + "w1.weight", inter, cfg.hidden))) * linear(
            x, s.get(w + "w3.weight", inter, cfg.hidden)
        )
        y = linear(y, s.get(w + "w2.weight", cfg.hidden, inter)) * top[tokens, slot, None]
        out.index_add_(0, tokens, y)
    return all_reduce(out)


def forward(s: Shards, ids: torch.Tensor, inter: int) -> torch.Tensor:
    """Full-vocabulary logits of the last position, on every rank."""
    cfg = s.cfg
    # Vocab-parallel embedding: rows this rank holds, zeros elsewhere, summed.
    local = ids - s.vocab_start
    mine = (local >= 0) & (local < s.vocab_rows)
    x = s.embed[local.clamp(0, max(s.vocab_rows - 1, 0))] if s.vocab_rows else None
    if x is None:
        x = torch.zeros(ids.shape[0], cfg.hidden, dtype=s.embed.dtype, device=ids.device)
    x = all_reduce(x * mine[:, None].to(x.dtype))
    cos, sin = rotary(cfg, ids.shape[0], x.device, x.dtype)
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, s.get(p + "input_layernorm.weight", cfg.hidden), cfg.eps)
        x = x + attention(s, i, h, cos, sin)
        h = rms_norm(x, s.get(p + "post_attention_layernorm.weight", cfg.hidden), cfg.eps)
        if cfg.type == "mixtral":
            x = x + moe(s, i, h)
        else:
            x = x + all_reduce(mlp(s, p + "mlp.", h, inter, cfg.type == "phi3"))
    x = rms_norm(x[-1:], s.get("model.norm.weight", cfg.hidden), cfg.eps)
    # Vocab-parallel lm_head: pad each rank's logits to the same width, gather.
    local_logits = linear(x, s.lm_head)[0]
    padded = torch.full((s.vocab_per,), float("-inf"), dtype=x.dtype, device=x.device)
    padded[: s.vocab_rows] = local_logits
    parts = [torch.empty_like(padded) for _ in range(s.world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[: cfg.vocab]


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init(args.device)
    try:
        cfg = Config(json.loads((args.model_dir / "config.json").read_text()))
        tensors = gpuload.load_sharded(
            args.model_dir, rank, world, device=device, framework="torch"
        )
        s = Shards(tensors, cfg, rank, world, getattr(torch, args.dtype))
        if cfg.type == "mixtral":
            inter = 0  # read per expert in moe()
        elif cfg.type == "phi3":
            inter = s.t["model.layers.0.mlp.gate_up_proj.weight"].shape[0] // 2
        else:
            inter = s.t["model.layers.0.mlp.gate_proj.weight"].shape[0]
        ids = torch.tensor(args.prompt, dtype=torch.long, device=device)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(args.max_new_tokens):
                token = int(forward(s, ids, inter).argmax())
                new.append(token)
                ids = torch.cat((ids, torch.tensor([token], device=device)))
        if rank == 0:
            print(json.dumps(new), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
