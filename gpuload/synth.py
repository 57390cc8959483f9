"""Synthetic safetensors checkpoints for tests, ``gpuload demo`` and benchmarks.

:func:`write_safetensors` is a small writer of its own, independent of
:mod:`gpuload.checkpoint`, so that tests can check the parser against it and
against ``safetensors``. :func:`write_model` writes a Hugging Face style model
directory (``config.json``, ``model-0000N-of-0000M.safetensors``,
``model.safetensors.index.json``) with the tensor names and shapes that
transformers uses for Llama, Mixtral, Qwen2-MoE and Phi-3, filled with seeded
random bytes. :func:`scale_spec` sizes an architecture to a byte budget and
:func:`cached_model` writes a model once and reuses it.

Tensor bytes are random, never zeros: a loader that returns a zero-filled
buffer (a missed read, a view into a recycled staging slot) is caught. Each
tensor's bytes depend only on ``seed`` and the tensor's name, not on the file
it lands in, so aligned and unaligned copies of a model hold the same tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .dtypes import DTYPES

FORMAT_VERSION = 1  # bump when the bytes or layout write_model produces change
CHUNK_BYTES = 16 << 20  # RNG chunk: large enough to be fast, small enough for any RAM
HF_MAX_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")

TensorData = bytes | bytearray | memoryview | np.ndarray


# --------------------------------------------------------------------------
# the writer


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: Callable[[], Iterable[memoryview]]  # called once, when the file is written


def _tensor_nbytes(name: str, dtype: str, shape: Any) -> int:
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ValueError(f"tensor {name!r}: shape {shape!r} must be a tuple of ints >= 0")
    bits = dt.bits * math.prod(int(d) for d in shape)
    if bits % 8:
        raise ValueError(
            f"tensor {name!r}: {dtype}{list(shape)} is {bits} bits, not a whole number of "
            "bytes (the format packs sub-byte dtypes and requires numel x bits % 8 == 0)"
        )
    return bits // 8


def _as_bytes(name: str, data: Any) -> memoryview:
    if isinstance(data, np.ndarray):
        if data.dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r}: big-endian array; safetensors is little-endian")
        arr = np.ascontiguousarray(data).reshape(-1)
        return memoryview(arr.view(np.uint8))
    if isinstance(data, (bytes, bytearray, memoryview)):
        mv = memoryview(data)
        return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
    raise TypeError(f"tensor {name!r}: data is {type(data).__name__}, not bytes or np.ndarray")


def _header(
    entries: list[_Entry],
    metadata: Mapping[str, str] | None,
    align: int | None,
    header_pad: int,
    unaligned: bool,
) -> bytes:
    doc: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("metadata must map str to str")
        doc["__metadata__"] = dict(metadata)
    pos = 0
    for e in entries:
        doc[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    n = len(text) + header_pad
    if unaligned:
        n += (1 - (8 + n)) % 8 or 8  # at least one space; data starts at 1 mod 8
    elif align is not None:
        n += -(8 + n) % align
    return text + b" " * (n - len(text))


def _chunks(path: Path, entries: list[_Entry]) -> Iterator[memoryview]:
    for e in entries:
        got = 0
        for chunk in e.chunks():
            got += len(chunk)
            yield chunk
        if got != e.nbytes:
            raise AssertionError(f"{path}: tensor {e.name!r} produced {got} of {e.nbytes} bytes")


_DONE = object()


def _ahead(chunks: Iterator[memoryview], depth: int = 2) -> Iterator[memoryview]:
    """Produce ``chunks`` in a thread, ``depth`` ahead of the consumer.

    The RNG holds the GIL but ``write`` releases it, so generating the next
    chunk while the last one is written about doubles the rate (measured).
    """
    q: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for c in chunks:
                if not put(c):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=produce, name="gpuload-synth", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _write_file(
    path: Path,
    entries: list[_Entry],
    metadata: Mapping[str, str] | None,
    align: int | None,
    header_pad: int,
    unaligned: bool,
    *,
    threaded: bool = False,
    fsync: bool = False,
) -> None:
    """Write one file: the length, the header, then each buffer in turn."""
    head = _header(entries, metadata, align, header_pad, unaligned)
    chunks = _chunks(path, entries)
    with open(path, "wb") as f, contextlib.closing(_ahead(chunks) if threaded else chunks) as it:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for chunk in it:
            f.write(chunk)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, tuple[int, ...], TensorData]],
    metadata: Mapping[str, str] | None = None,
    *,
    align: int | None = 8,
    header_pad: int = 0,
    unaligned: bool = False,
) -> None:
    """Write a ``.safetensors`` file from raw tensor bytes, in the given order.

    Parameters
    ----------
    path
        The file to create (overwritten if it exists).
    tensors
        Ordered mapping ``name -> (dtype, shape, data)``: ``dtype`` a safetensors
        dtype name (``"BF16"``, ``"F8_E4M3"``, ``"F4"``, ...), ``shape`` a tuple
        of ints (``()`` for a scalar), ``data`` the tensor's bytes (bytes-like or
        any C- or non-contiguous little-endian ``np.ndarray``, taken as raw bytes).
        Sub-byte dtypes (F4, F6_*) are packed: ``data`` holds numel x bits / 8
        bytes.
    metadata
        The ``__metadata__`` string map, or None for none.
    align
        Pad the JSON header with spaces so the data section starts at a
        multiple of ``align`` bytes (8: what ``safetensors`` writes). None: no
        alignment padding.
    header_pad
        Extra spaces added to the header (before alignment padding).
    unaligned
        Pad the header so the data section starts at 1 mod 8 (``align`` is not
        applied): then every tensor whose preceding tensors all have even byte
        sizes sits at an odd file offset.

    Raises
    ------
    ValueError
        Unknown dtype, bad shape, numel x bits not a multiple of 8, data of the
        wrong length, or bad ``align`` / ``header_pad``.

    Notes
    -----
    Offsets are relative to the data section, which starts at ``8 + N`` (``N``
    the header length). The header and each tensor's buffer are written in
    turn; nothing is concatenated.
    """
    if align is not None and (isinstance(align, bool) or not isinstance(align, int) or align < 1):
        raise ValueError(f"{align=} must be a positive int or None")
    if isinstance(header_pad, bool) or not isinstance(header_pad, int) or header_pad < 0:
        raise ValueError(f"{header_pad=} must be an int >= 0")
    entries = []
    for name, spec in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} must be a str other than '__metadata__'")
        dtype, shape, data = spec
        nbytes = _tensor_nbytes(name, dtype, shape)
        buf = _as_bytes(name, data)
        if len(buf) != nbytes:
            raise ValueError(
                f"tensor {name!r}: {dtype}{list(shape)} needs {nbytes} bytes, data has {len(buf)}"
            )
        entries.append(
            _Entry(name, dtype, tuple(int(d) for d in shape), nbytes, lambda b=buf: (b,))
        )
    _write_file(Path(path), entries, metadata, align, header_pad, unaligned)


# --------------------------------------------------------------------------
# random tensor bytes


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def random_chunks(seed: int, name: str, nbytes: int) -> Iterator[memoryview]:
    """Seeded random bytes for one tensor, in chunks of at most 16 MiB.

    Never all zeros: the first 8 bytes are made non-zero if the RNG drew zeros.
    """
    rng = _rng(seed, name)
    first = True
    for pos in range(0, nbytes, CHUNK_BYTES):
        n = min(CHUNK_BYTES, nbytes - pos)
        # integers() fills ~5x faster than rng.bytes(); draw whole words, trim.
        words = rng.integers(0, 2**64, -(-n // 8), dtype=np.uint64)
        if first and not words[0]:
            words[0] = 1
        first = False
        yield memoryview(words).cast("B")[:n]


def random_bytes(seed: int, name: str, nbytes: int) -> bytes:
    """All of :func:`random_chunks` as one ``bytes`` (for small tensors and tests)."""
    return b"".join(random_chunks(seed, name, nbytes))


# --------------------------------------------------------------------------
# model architectures

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


def _round(x: float, m: int) -> int:
    return max(m, round(x / m) * m)


def _kv_heads(heads: int, group: int) -> int:
    """KV heads near heads / group that world 8 can use: a divisor of 8 (replicated
    across ranks) or a multiple of 8 (split), and a divisor of heads."""
    ok = [k for k in range(1, heads + 1) if heads % k == 0 and (8 % k == 0 or k % 8 == 0)]
    want = heads / group
    return min(ok, key=lambda k: (abs(math.log(k / want)), -k))


def _widths(base: ModelSpec, limit: int) -> Iterator[tuple[int, int]]:
    """Candidate ``(hidden, head_dim)``: multiples of 128 with heads a multiple of 8.

    The preset's head_dim is kept from ``8 x head_dim`` up; narrower models
    (fewer than 8 heads of that size) use the widest of 64/32/16 that fits.
    """
    hd0 = base.head_dim
    for h in range(128, limit + 1, 128):
        if h >= 8 * hd0:
            if h % (8 * hd0) == 0:
                yield h, hd0
        else:
            hd = next((d for d in (64, 32, 16) if d <= hd0 and h % (8 * d) == 0), None)
            if hd is not None:
                yield h, hd


def _at_width(base: ModelSpec, h: int, hd: int, ffn: float, layers: int) -> ModelSpec:
    """``base`` at hidden size ``h``, head_dim ``hd``, FFN widths scaled by ``ffn``."""
    heads = h // hd
    w = h / base.hidden

    def width(x: int) -> int:
        return _round(x * w * ffn, 128) if x else 0

    return dataclasses.replace(
        base,
        hidden=h,
        heads=heads,
        kv_heads=_kv_heads(heads, base.heads // base.kv_heads),
        head_dim=hd,
        intermediate=width(base.intermediate),
        vocab=min(_round(base.vocab * w, 512), -(-base.vocab // 512) * 512),
        layers=layers,
        moe_intermediate=width(base.moe_intermediate),
        shared_intermediate=width(base.shared_intermediate),
    )


def scale_spec(
    preset: str | ModelSpec, target_bytes: int, *, dtype: str = "BF16", tolerance: float = 0.1
) -> ModelSpec:
    """The architecture of ``preset`` resized to about ``target_bytes`` of tensors.

    Hidden size, layer count and FFN widths are chosen together: among widths
    whose model lands within 3% of the target (FFN widths may move by up to a
    third to get there), the one whose depth is closest to the preset's
    depth-to-width ratio wins. Dims stay multiples of 128, heads a multiple of
    8 (so world 8 divides them), KV heads a divisor or multiple of 8, the vocab
    a multiple of 512 (64 x 8, vLLM's padding unit times world 8), expert
    counts as in the preset.

    Raises
    ------
    ValueError
        No such model lies within ``tolerance`` (default ±10%) of the target.
    """
    base = get_spec(preset)
    if dtype not in DTYPES:
        raise ValueError(f"unknown {dtype=}; known: {', '.join(DTYPES)}")
    if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 1:
        raise ValueError(f"{target_bytes=} must be a positive int (bytes)")
    best: tuple[float, float, ModelSpec] | None = None
    for h, hd in _widths(base, 4 * max(base.hidden, 1024)):
        one = _at_width(base, h, hd, 1.0, 1)
        g = sum(math.prod(s) for _, s in one.global_tensors()) * DTYPES[dtype].bits // 8
        per_layer = one.nbytes(dtype) - g
        est = round((target_bytes - g) / per_layer)
        natural = max(1.0, base.layers * h / base.hidden)
        for layers, ffn in itertools.product(
            range(max(1, est - 2), max(1, est + 2) + 1), np.linspace(0.75, 4 / 3, 29)
        ):
            spec = _at_width(base, h, hd, float(ffn), layers)
            err = abs(spec.nbytes(dtype) - target_bytes) / target_bytes
            score = (abs(math.log(layers / natural)) if err <= 0.03 else 100 + err, err)
            if best is None or score < best[:2]:
                best = (*score, spec)
    assert best is not None
    spec = best[2]
    size = spec.nbytes(dtype)
    if abs(size - target_bytes) > tolerance * target_bytes:
        raise ValueError(
            f"no {base.family} model within {tolerance:.0%} of {target_bytes} bytes "
            f"(closest: {size} bytes); the smallest has hidden 128 and 1 layer"
        )
    return spec


# --------------------------------------------------------------------------
# model directories


_OURS = re.compile(
    r"config\.json|model\.safetensors\.index\.json|gpuload-synth\.json"
    r"|model-\d{5}-of-\d{5}\.safetensors"
)


def _split(sizes: list[int], num_files: int) -> list[int]:
    """Cut points (tensor indices) splitting ``sizes`` into ``num_files`` runs of
    near-equal bytes, each non-empty, order kept."""
    ends = list(itertools.accumulate(sizes))
    cuts = [0]
    for k in range(1, num_files):
        target = ends[-1] * k / num_files
        j = bisect_left(ends, target)  # the first tensor ending at or after target
        if j > 0 and target - ends[j - 1] <= ends[j] - target:
            j -= 1
        cuts.append(min(max(j + 1, cuts[-1] + 1), len(sizes) - (num_files - k)))
    return [*cuts, len(sizes)]


def write_model(
    dir: str | os.PathLike[str],
    spec_or_preset: str | ModelSpec,
    *,
    dtype: str = "BF16",
    num_files: int | None = None,
    unaligned: bool = False,
    seed: int = 0,
    target_bytes: int | None = None,
    fsync: bool = False,
) -> Path:
    """Write a Hugging Face style model directory of random tensors.

    Parameters
    ----------
    dir
        Directory to create, or one that holds only an earlier synthetic
        model (its files are replaced).
    spec_or_preset
        A :class:`ModelSpec` or a name in :data:`PRESETS`.
    dtype
        Safetensors dtype of every tensor (BF16, F16, F32, F8_E4M3, ...).
    num_files
        Number of ``model-0000N-of-0000M.safetensors`` files; tensors are cut
        in state-dict (layer) order into runs of near-equal bytes. Default:
        as many as transformers' 5 GB ``max_shard_size`` would make.
    unaligned
        Pad every header so the data section starts at 1 mod 8: with the
        even-sized tensors of these models every tensor offset is odd.
    seed
        RNG seed; a tensor's bytes depend only on ``seed`` and its name.
    target_bytes
        Resize the architecture to about this many tensor bytes first
        (:func:`scale_spec`).
    fsync
        ``fsync`` each file before returning (durable, for caches).

    Returns
    -------
    Path
        ``dir``, holding ``config.json``, the ``.safetensors`` files and
        ``model.safetensors.index.json``.

    Notes
    -----
    Memory use stays under 64 MiB (four 16 MiB RNG chunks in flight), whatever
    the model size. Generation runs in a thread beside the writes.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown {dtype=}; known: {', '.join(DTYPES)}")
    if target_bytes is not None:
        spec = scale_spec(spec_or_preset, target_bytes, dtype=dtype)
    else:
        spec = get_spec(spec_or_preset)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{seed=} must be an int >= 0")
    tensors = spec.tensors()
    sizes = [_tensor_nbytes(n, dtype, s) for n, s in tensors]
    total = sum(sizes)
    if num_files is None:
        num_files = max(1, -(-total // HF_MAX_SHARD_BYTES))
    if isinstance(num_files, bool) or not isinstance(num_files, int) or num_files < 1:
        raise ValueError(f"{num_files=} must be a positive int")
    if num_files > len(tensors):
        raise ValueError(f"{num_files=} is more than the model's {len(tensors)} tensors")

    root = Path(dir)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a directory")
    # Rewrite an earlier synthetic model in place; refuse to touch anything else.
    old = list(root.iterdir()) if root.exists() else []
    foreign = [p.name for p in old if not (_OURS.fullmatch(p.name) and p.is_file())]
    if foreign:
        raise FileExistsError(
            f"{root}: holds files write_model did not write ({', '.join(foreign[:3])})"
        )
    for p in old:
        p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < total * 1.02:
        raise OSError(f"{root}: model needs {total} bytes, only {free} free")

    cuts = _split(sizes, num_files)
    weight_map: dict[str, str] = {}
    for k in range(num_files):
        fname = f"model-{k + 1:05d}-of-{num_files:05d}.safetensors"
        entries = []
        for i in range(cuts[k], cuts[k + 1]):
            (name, shape), nbytes = tensors[i], sizes[i]
            chunks = functools.partial(random_chunks, seed, name, nbytes)
            entries.append(_Entry(name, dtype, shape, nbytes, chunks))
            weight_map[name] = fname
        _write_file(
            root / fname, entries, {"format": "pt"}, 8, 0, unaligned, threaded=True, fsync=fsync
        )

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(spec.config(dtype), indent=2) + "\n")
    return root


# --------------------------------------------------------------------------
# the cache

_STAMP = "gpuload-synth.json"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "gpuload" / "synth"


def _complete(root: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``root`` was written for ``stamp`` and holds every file it lists,
    at the listed sizes."""
    try:
        found = json.loads((root / _STAMP).read_text())
        if {k: found[k] for k in stamp} != stamp:
            return False
        return all((root / f).stat().st_size == n for f, n in found["files"].items())
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cached_model(
    preset: str | ModelSpec,
    target_bytes: int | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: str = "BF16",
    unaligned: bool = False,
    seed: int = 0,
    num_files: int | None = None,
) -> Path:
    """A model written by :func:`write_model` once, then reused.

    ``cache_dir`` defaults to ``~/.cache/gpuload/synth``. An entry's name
    encodes preset, size, dtype, alignment, seed, file count and
    :data:`FORMAT_VERSION`; its stamp file records the exact spec and every
    file's size. A model is written into a temporary directory, fsynced and
    renamed into place when complete, so an interrupted write is never reused;
    an entry that does not match its stamp is rewritten. ``target_bytes=None``
    keeps the preset's own size.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown {dtype=}; known: {', '.join(DTYPES)}")
    spec = (
        get_spec(preset) if target_bytes is None else scale_spec(preset, target_bytes, dtype=dtype)
    )
    if isinstance(preset, str):
        name = preset
    else:
        name = "spec" + hashlib.blake2b(repr(spec).encode(), digest_size=6).hexdigest()
    parts = [name, "full" if target_bytes is None else str(target_bytes), dtype]
    parts += ["unaligned" if unaligned else "aligned", f"seed{seed}"]
    parts += ["files" + ("auto" if num_files is None else str(num_files)), f"v{FORMAT_VERSION}"]
    # The spec goes in the stamp, not the name: a changed scale_spec or a
    # different ModelSpec under the same name rewrites the entry.
    key = "-".join(parts)
    stamp = {"key": key, "spec": dataclasses.asdict(spec)}
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / key
    if _complete(final, stamp):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for old in cache.glob(f".tmp-{key}-{host}-*"):  # left by killed writers on this host
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-{host}-{os.getpid()}-", dir=cache))
    try:
        m = write_model(
            tmp / "m", spec, dtype=dtype, num_files=num_files, unaligned=unaligned,
            seed=seed, fsync=True,
        )  # fmt: skip
        files = {p.name: p.stat().st_size for p in sorted(m.iterdir())}
        (m / _STAMP).write_text(json.dumps({**stamp, "files": files}, indent=1))
        if final.exists():  # stale or incomplete
            shutil.rmtree(final)
        try:
            os.rename(m, final)
        except OSError:
            if not _complete(final, stamp):  # not a concurrent writer that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
