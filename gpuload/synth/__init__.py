"""Synthetic safetensors checkpoints for tests, ``gpuload demo`` and benchmarks.

:func:`write_safetensors` (:mod:`.writer`) is a small writer of its own,
independent of :mod:`gpuload.format.header`, so that tests can check the parser
against it and against ``safetensors``. :func:`write_model` (:mod:`.layout`)
writes a Hugging Face style model directory (``config.json``,
``model-0000N-of-0000M.safetensors``, ``model.safetensors.index.json``) with
the tensor names and shapes that transformers uses for Llama, Mixtral,
Qwen2-MoE and Phi-3 (:mod:`.models`), filled with seeded random bytes
(:mod:`.rng`). :func:`scale_spec` (:mod:`.sizing`) sizes an architecture to a
byte budget and :func:`cached_model` (:mod:`.cache`) writes a model once and
reuses it.

Tensor bytes are random, never zeros: a loader that returns a zero-filled
buffer (a missed read, a view into a recycled staging slot) is caught. Each
tensor's bytes depend only on ``seed`` and the tensor's name, not on the file
it lands in, so aligned and unaligned copies of a model hold the same tensors.
"""

from gpuload.synth.cache import cached_model, clear_cache, default_cache_dir
from gpuload.synth.layout import FORMAT_VERSION, HF_MAX_SHARD_BYTES, write_model
from gpuload.synth.models import PRESETS, Family, ModelSpec, get_spec
from gpuload.synth.rng import CHUNK_BYTES, random_bytes, random_chunks
from gpuload.synth.sizing import scale_spec
from gpuload.synth.writer import TensorData, write_safetensors

__all__ = [
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "HF_MAX_SHARD_BYTES",
    "PRESETS",
    "Family",
    "ModelSpec",
    "TensorData",
    "cached_model",
    "clear_cache",
    "default_cache_dir",
    "get_spec",
    "random_bytes",
    "random_chunks",
    "scale_spec",
    "write_model",
    "write_safetensors",
]
