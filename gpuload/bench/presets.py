"""Bench presets: which synthetic models, how big, how many runs.

The ``12gb`` preset is sized for a 12 GB card: everything the bench puts on
the device at once stays under :data:`DEVICE_BUDGET` (11 GiB), counted as

==============================================  ===========
CUDA context, cuBLAS/cupy/kvikio runtime        1.00 GiB (reserve; ~0.5 GiB measured on H100s)
gpuload device scratch (``device_scratch_bytes``)  0.50 GiB
the loaded model's results                      see below
==============================================  ===========

* dense: Llama-like, 8 GiB of BF16 (hidden 3072, 28 layers, 8.01 GiB exactly
  as :func:`gpuload.synth.scale_spec` sizes it), loaded whole at world=1:
  1.00 + 0.50 + 8.01 = 9.51 GiB < 11 GiB, leaving 1.49 GiB for a peer's own
  staging (fastsafetensors' bounce buffers, InstantTensor's ring);
* MoE: Qwen-MoE-like, 14 GiB (13.78 GiB: 60 experts x 13 layers), which no
  12 GB card holds. Routed experts (11.43 GiB) stay in host memory
  (``cpu_resident=True``); the rest (2.35 GiB: attention, shared experts,
  router, embeddings) goes to the device: 1.00 + 0.50 + 2.35 = 3.85 GiB.

The H2D/D2D probes (1 GiB, and 2 GiB for D2D) run before any model is
loaded and are freed first. Host side: the files (21.8 GiB) should fit the
page cache for warm runs to be warm: 32 GiB of RAM or more. The bench says
so when they do not.

CPU presets use F16: numpy has no bfloat16, and safetensors' numpy API (the
CPU peer) refuses BF16. F16 has BF16's width, so the bytes moved are the same.
"""

from __future__ import annotations

import dataclasses
import math
import re

from gpuload.host.resident import PRESET_EXPERTS
from gpuload.synth import scale_spec

GiB = 1 << 30
DEVICE_BUDGET = 11 * GiB
CONTEXT_RESERVE = 1 * GiB
SCRATCH = 512 << 20


@dataclasses.dataclass(frozen=True)
class Model:
    preset: str  # a gpuload.synth preset
    gib: float | None  # tensor bytes to scale to; None: the preset's own size

    @property
    def target_bytes(self) -> int | None:
        return None if self.gib is None else int(self.gib * GiB)


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    name: str
    device: str  # "cuda" or "cpu": where the preset is meant to run
    dense: Model
    moe: Model
    dtype: str = "BF16"
    worlds: tuple[int, ...] = (2, 4, 8)
    runs: int = 3
    warmup: int = 1
    settings: dict = dataclasses.field(default_factory=dict)  # gpuload keywords
    device_budget: int | None = None  # bytes; checked against measured peaks
    about: str = ""


PRESETS: dict[str, BenchPreset] = {
    p.name: p
    for p in (
        BenchPreset(
            "tiny",
            "cpu",
            Model("tiny", None),
            Model("tiny-qwen-moe", None),
            dtype="F16",
            about="a few hundred KiB: the CI smoke test (seconds)",
        ),
        BenchPreset(
            "cpu-2gb",
            "cpu",
            Model("llama", 2),
            Model("qwen-moe", 2),
            dtype="F16",
            about="2 GiB dense + 2 GiB MoE, for a CPU-only machine",
        ),
        BenchPreset(
            "12gb",
            "cuda",
            Model("llama", 8),
            Model("qwen-moe", 14),
            settings={"device_scratch_bytes": SCRATCH},
            device_budget=DEVICE_BUDGET,
            about="8 GiB dense + 14 GiB MoE (experts on the CPU): fits a 12 GB GPU",
        ),
    )
}


def footprint(model: Model, dtype: str) -> tuple[int, int]:
    """``(total, routed-expert)`` tensor bytes of a preset model."""
    from gpuload.synth import get_spec

    spec = get_spec(model.preset) if model.gib is None else scale_spec(
        model.preset, model.target_bytes, dtype=dtype  # type: ignore[arg-type]
    )  # fmt: skip
    rx = re.compile(PRESET_EXPERTS)
    width = {"BF16": 2, "F16": 2, "F32": 4}.get(dtype, 2)
    total = spec.nbytes(dtype)
    experts = sum(math.prod(s) for n, s in spec.tensors() if rx.search(n)) * width
    return total, experts


def device_plan(p: BenchPreset) -> dict[str, int]:
    """The device bytes each model needs under ``p`` (the arithmetic above)."""
    dense, _ = footprint(p.dense, p.dtype)
    moe, experts = footprint(p.moe, p.dtype)
    fixed = CONTEXT_RESERVE + p.settings.get("device_scratch_bytes", SCRATCH)
    return {"dense": fixed + dense, "moe": fixed + moe - experts, "moe_experts_host": experts}
