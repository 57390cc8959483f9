"""cpu_resident tensors of a remote checkpoint: nothing can be mapped, so
their ranges are read into host memory and they are returned as copies."""

from __future__ import annotations

import numpy as np

from gpuload.host.backend import HostBackend
from gpuload.host.outputs import convert as host_convert
from gpuload.host.pipeline import HostPipeline
from gpuload.host.prefault import PrefaultReport
from gpuload.plan.ops import PlanOptions
from gpuload.plan.planner import plan_reads
from gpuload.report import LoadReport


def read_resident(lp, reader, cfg, report: LoadReport) -> dict[str, np.ndarray]:
    """cpu_resident tensors of a remote checkpoint: nothing to map, so they
    are read (only their selection's ranges) into host memory, and reported
    as copies; prefault does not apply to them."""
    items = [(lp.checkpoint.tensors[n], sel) for n, sel in lp.resident.items()]
    plan = plan_reads(
        items,
        PlanOptions(
            chunk_bytes=max(1, min(cfg.chunk_bytes, cfg.staging_bytes // 2)),
            min_chunk_bytes=min(cfg.min_chunk_bytes, cfg.chunk_bytes),
        ),
    )
    bufs = HostBackend(cfg.replace(backend="posix")).allocate(plan)
    scratch = LoadReport(path=report.path, rank=0, world=1, device="cpu", backend="remote")
    HostPipeline(cfg.threads, cfg.staging_bytes).run(plan, bufs, reader, scratch)
    arrays = host_convert(bufs, list(plan.tensors), "numpy")
    report.bytes_resident = sum(a.nbytes for a in arrays.values())
    report.resident_copies = sorted(arrays)
    report.prefault = PrefaultReport(
        skipped_reason="remote checkpoint: prefault does not apply (nothing is mapped); "
        "cpu_resident tensors were read into host memory as copies",
        copies=sorted(arrays),
    )
    return arrays
