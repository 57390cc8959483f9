"""The contenders: gpuload and its peers, each behind one small adapter.

A contender is opened once per bench (``open``), then loads one
:class:`Case` (a scenario's model, rank and world) per call, returning
``{name: tensor}`` with the tensors where that loader puts them. Whatever
cannot run here raises :class:`Skip` with the reason, which the bench
prints; nothing here is installed by gpuload itself.

Peers use their documented public APIs only:

* safetensors: ``load_file(device=...)`` for whole models,
  ``safe_open(device=...).get_slice`` for shards (numpy on the CPU);
* vLLM-style: what vLLM's default loader does per rank: every tensor read in
  full on the CPU (``safe_open(...).get_tensor``), ``narrow``-ed to the rank's
  part, copied to the device;
* fastsafetensors ``fastsafe_open`` (``nogds=True``), Run:ai
  ``SafetensorsStreamer.stream_files`` and InstantTensor ``safe_open``: whole
  models; their tensor-parallel paths need one process per rank and
  ``torch.distributed``, which a single-process bench does not start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from gpuload.errors import BackendUnavailable, GpuloadError
from gpuload.sharding.selection import Selection

SCENARIOS = ("full", "shard", "moe")


class Skip(Exception):
    """This contender cannot run here; the message says why."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One load: ``rank`` of ``world`` of the model at ``path``."""

    scenario: str  # "full" | "shard" | "moe"
    path: str
    files: tuple[str, ...]
    rank: int
    world: int
    selections: Mapping[str, Selection]  # what the rank gets, per vLLM's sharding
    resident: frozenset[str] = frozenset()  # tensors kept in host memory (moe)
    nbytes: int = 0  # bytes delivered


@dataclasses.dataclass
class Ctx:
    device: str  # "cpu" or "cuda:N"
    threads: int
    framework: str = "numpy"  # peers' framework on the CPU: "numpy", or "pt" for bf16
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # gpuload keywords
    # Whether --threads (or GPULOAD_THREADS) chose the threads: gpuload gets
    # them only then, so a default run measures gpuload's own default (one
    # reader per core for a warm CPU load).
    threads_set: bool = True


def _need(module: str, pip: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{pip} not installed (pip install {pip}): {e}") from None


def _narrow(t: Any, sel: Selection, torch: Any | None) -> Any:
    """The rank's part of a full tensor, by slicing (a view or a copy)."""
    if sel.dim is None:
        return t
    parts = []
    for start, n in sel.ranges:
        parts.append(
            t.narrow(sel.dim, start, n) if torch else np.take(t, range(start, start + n), sel.dim)
        )
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, sel.dim) if torch else np.concatenate(parts, sel.dim)


class Contender:
    name = ""
    kind = "peer"  # "gpuload" | "peer"
    api = ""  # what it calls, for the table's notes
    takes: Mapping[str, str] = {}  # scenario -> "" (runs) or why it does not
    opt_in = False  # runs only when --contenders names it (variants of gpuload's settings)

    def open(self, ctx: Ctx) -> None:
        self.ctx = ctx

    def why_not(self, scenario: str) -> str | None:
        reason = self.takes.get(scenario, f"{self.name} has no {scenario} path")
        return reason or None

    def load(self, case: Case) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Gpuload(Contender):
    kind = "gpuload"
    takes = {"full": "", "shard": "", "moe": ""}

    def __init__(self, backend: str, *, device: str | None = None, **variant: Any) -> None:
        """``variant``: settings that make this an opt-in variant (``scatter=False``,
        ``gather="zerocopy"``), timed in turn with the default; ``device``:
        "cpu" or "cuda", where the variant means something."""
        self.backend, self.variant, self.only_on = backend, variant, device
        label = ", ".join(f"{k}={v}" for k, v in variant.items())
        self.name = f"gpuload ({backend}" + (f", {label})" if label else ")")
        self.opt_in = bool(variant)
        self.api = "Loader.load"

    def open(self, ctx: Ctx) -> None:
        super().open(ctx)
        gpuload = importlib.import_module("gpuload")
        fw = "torch" if ctx.device != "cpu" else None
        if self.only_on is not None and (ctx.device == "cpu") != (self.only_on == "cpu"):
            raise Skip(f"{self.name} is a {self.only_on} variant; this run is on {ctx.device}")
        try:
            self.loader = gpuload.Loader(
                device=ctx.device, backend=self.backend, framework=fw, progress=False,
                **({"threads": ctx.threads} if ctx.threads_set else {}),
                **{**ctx.settings, **self.variant},
            )  # fmt: skip
        except (BackendUnavailable, GpuloadError, ImportError, ValueError) as e:
            raise Skip(f"{type(e).__name__}: {e}") from None
        if self.loader.backend != self.backend:
            got, why = self.loader.backend, self.loader.backend_reason
            self.loader.close()
            raise Skip(f"asked for backend={self.backend!r}, got {got!r} ({why})")
        self.api = f"Loader(device={ctx.device!r}, backend={self.backend!r}).load"

    def load(self, case: Case) -> dict:
        # The path, not a parsed Checkpoint: every run parses headers, as peers do.
        resident = True if case.resident else None
        return self.loader.load(case.path, case.rank, case.world, cpu_resident=resident)

    def close(self) -> None:
        loader = getattr(self, "loader", None)
        if loader is not None:
            loader.close()


class Safetensors(Contender):
    name = "safetensors"
    takes = {"full": "", "shard": "", "moe": ""}

    def open(self, ctx: Ctx) -> None:
        super().open(ctx)
        self.st = _need("safetensors", "safetensors")
        self.gpu = ctx.device != "cpu"
        fw = "pt" if self.gpu else ctx.framework
        self.fw = fw
        self.torch = _need("torch", "torch") if fw == "pt" else None
        mod = "safetensors.torch" if fw == "pt" else "safetensors.numpy"
        self.load_file = importlib.import_module(mod).load_file
        self.api = f"load_file / safe_open(framework={fw!r}, device={ctx.device!r}).get_slice"

    def load(self, case: Case) -> dict:
        dev = self.ctx.device
        if case.scenario == "full":
            out: dict = {}
            for f in case.files:
                out.update(self.load_file(f, device=dev) if self.fw == "pt" else self.load_file(f))
            return out
        return get_slice_shard(
            case.files, case.selections, framework=self.fw, device=dev, resident=case.resident
        )


def get_slice_shard(
    files: Iterable[str],
    selections: Mapping[str, Selection],
    *,
    framework: str = "numpy",
    device: str = "cpu",
    resident: Iterable[str] = (),
) -> dict:
    """safetensors' own way to read part of a tensor: ``safe_open(...).get_slice``
    and slicing, per selection. Tensors named in ``resident`` come back whole,
    as host copies (``get_tensor`` on a CPU handle); tensors without a
    selection are not read."""
    st = importlib.import_module("safetensors")
    torch = importlib.import_module("torch") if framework == "pt" else None
    keep_on_host = frozenset(resident)
    out = {}
    for f in files:
        with contextlib.ExitStack() as stack:
            h = stack.enter_context(st.safe_open(f, framework=framework, device=device))
            if keep_on_host and device != "cpu":
                host = stack.enter_context(st.safe_open(f, framework=framework, device="cpu"))
            else:
                host = h
            for name in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                sel = selections.get(name)
                if sel is None:
                    continue
                if name in keep_on_host:
                    out[name] = host.get_tensor(name)
                    continue
                if sel.dim is None:
                    out[name] = h.get_tensor(name)
                    continue
                parts = []
                for start, n in sel.ranges:
                    idx = [slice(None)] * len(sel.shape)
                    idx[sel.dim] = slice(start, start + n)
                    part = h.get_slice(name)[tuple(idx)]
                    if torch is not None and str(part.device) != device:
                        part = part.to(device)  # in case the slice stays on the host
                    parts.append(part)
                cat = torch.cat if torch is not None else np.concatenate
                out[name] = parts[0] if len(parts) == 1 else cat(parts, sel.dim)
    return out


class VllmStyle(Contender):
    name = "vLLM-style"
    api = "safe_open(device='cpu').get_tensor, narrow, copy to the device (per rank)"
    takes = {"full": "", "shard": "", "moe": "vLLM's default loader has no CPU-resident experts"}

    def open(self, ctx: Ctx) -> None:
        super().open(ctx)
        self.st = _need("safetensors", "safetensors")
        self.gpu = ctx.device != "cpu"
        self.fw = "pt" if self.gpu else ctx.framework
        self.torch = _need("torch", "torch") if self.fw == "pt" else None

    def load(self, case: Case) -> dict:
        out = {}
        for f in case.files:
            with self.st.safe_open(f, framework=self.fw, device="cpu") as h:
                for name in h.keys():  # noqa: SIM118
                    sel = case.selections.get(name)
                    if sel is None:
                        continue
                    full = h.get_tensor(name)  # the whole tensor, on every rank
                    part = _narrow(full, sel, self.torch)
                    if self.gpu:  # param.data.copy_(loaded_weight.narrow(...))
                        dst = self.torch.empty(sel.shape, dtype=full.dtype, device=self.ctx.device)
                        dst.copy_(part)
                        out[name] = dst
                    else:  # an owned copy, as the CPU model's parameter would be
                        out[name] = full if sel.dim is None else np.array(part, copy=True)
        return out


_TP = "its tensor-parallel path needs one process per rank (torch.distributed)"
_MOE = "it has no CPU-resident placement"


class FastSafetensors(Contender):
    name = "fastsafetensors"
    api = "fastsafe_open(files, device=..., nogds=True).get_tensor"
    takes = {"full": "", "shard": _TP, "moe": _MOE}

    def open(self, ctx: Ctx) -> None:
        super().open(ctx)
        _need("torch", "torch")
        self.fst = _need("fastsafetensors", "fastsafetensors")

    def load(self, case: Case) -> dict:
        with self.fst.fastsafe_open(
            list(case.files), framework="pt", device=self.ctx.device, nogds=True
        ) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


class Runai(Contender):
    name = "Run:ai streamer"
    api = "SafetensorsStreamer.stream_files(files, device='cpu'), then .to(device)"
    takes = {"full": "", "shard": _TP, "moe": _MOE}

    def open(self, ctx: Ctx) -> None:
        super().open(ctx)
        _need("torch", "torch")
        self.rms = _need("runai_model_streamer", "runai-model-streamer")

    def load(self, case: Case) -> dict:
        dev = self.ctx.device
        with self.rms.SafetensorsStreamer() as s:
            s.stream_files(list(case.files), device="cpu")
            if dev == "cpu":
                return dict(s.get_tensors())
            return {k: t.to(dev) for k, t in s.get_tensors()}


class InstantTensor(Contender):
    name = "InstantTensor"
    api = "instanttensor.safe_open(files, framework='pt', device=N).tensors()"
    takes = {"full": "", "shard": _TP, "moe": _MOE}

    def open(self, ctx: Ctx) -> None:
        super().open(ctx)
        if ctx.device == "cpu":
            raise Skip("it loads to CUDA devices only")
        _need("torch", "torch")
        self.it = _need("instanttensor", "instanttensor")
        self.index = int(ctx.device.split(":")[1])

    def load(self, case: Case) -> dict:
        # A copy of the list: safe_open sorts the one it is given in place.
        with self.it.safe_open(list(case.files), framework="pt", device=self.index) as f:
            return dict(f.tensors())  # copy=True (default): tensors own their memory


def all_contenders() -> list[Contender]:
    return [
        Gpuload("kvikio"),
        Gpuload("posix"),
        # opt-in: named in --contenders, timed in turn with the default above
        Gpuload("posix", device="cpu", scatter=False),  # staged + gathered covering reads
        Gpuload("posix", device="cpu", mapped_gather=False),  # covering reads even when cached
        Gpuload("posix", device="cpu", hugepages=False),  # results from np.empty
        *(Gpuload("posix", device="cuda", gather=g) for g in ("device", "zerocopy", "pack")),
        Safetensors(),
        VllmStyle(),
        FastSafetensors(),
        Runai(),
        InstantTensor(),
    ]
