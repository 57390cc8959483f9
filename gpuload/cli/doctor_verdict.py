"""What ``gpuload doctor``'s findings mean for this machine: lines, verdict, report.

A :class:`Line` is one finding: ``ok``, a ``problem`` (with its fix) or
``info``. :func:`settle` decides, for the machine the doctor ran on, which
GPU-path findings are problems: where no GPU is visible and none was asked
for, a missing GPU package is information (its install hint in the value),
not a failure. It then sums up the two paths a user has, the GPU path and
the CPU path; the CPU path is "ok" only when :func:`self_check` loaded a
real checkpoint here and every byte matched.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

CU = "pip install 'gpuload[cu13]' (NVIDIA driver >= 580, CUDA 13) or 'gpuload[cu12]' (>= 525)"
OK, PROBLEM, INFO = "ok", "problem", "info"
MARK = {OK: "ok ", PROBLEM: "BAD", INFO: "-- "}


@dataclass(frozen=True)
class Line:
    """One finding. Only a problem carries a fix: an ``ok`` (or information)
    line with one is refused where it is made, so no report can show a
    ``fix:`` under an ``ok``. ``gpu``: the line belongs to the GPU path."""

    name: str
    status: str
    value: str
    fix: str | None = None
    gpu: bool = False

    def __post_init__(self) -> None:
        if self.status not in MARK:
            raise ValueError(f"doctor line {self.name!r}: unknown status {self.status!r}")
        if self.fix is not None and self.status != PROBLEM:
            raise ValueError(f"doctor line {self.name!r}: only a problem carries a fix")

    @property
    def ok(self) -> bool:
        return self.status == OK


def ok(name: str, value: str, *, gpu: bool = False) -> Line:
    return Line(name, OK, value, gpu=gpu)


def bad(name: str, value: str, fix: str, *, gpu: bool = False) -> Line:
    return Line(name, PROBLEM, value, fix, gpu=gpu)


def info(name: str, value: str, *, gpu: bool = False) -> Line:
    return Line(name, INFO, value, gpu=gpu)


def check(name: str, good: bool, value: str, fix: str, *, gpu: bool = False) -> Line:
    """``ok`` when ``good``, else a problem with ``fix``."""
    return ok(name, value, gpu=gpu) if good else bad(name, value, fix, gpu=gpu)


@dataclass(frozen=True)
class Report:
    lines: list[Line]
    arch: str | None
    gpu_checked: bool  # GPU-path failures count as problems
    gpu_path: Line
    cpu_path: Line

    @property
    def problems(self) -> int:
        return sum(ln.status == PROBLEM for ln in self.lines)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def text(self) -> str:
        width = max(len(ln.name) for ln in self.lines)
        out = []
        for ln in self.lines:
            out.append(f"{MARK[ln.status]}  {ln.name.ljust(width)}  {ln.value}")
            if ln.fix:
                out.append(f"     {''.ljust(width)}  fix: {ln.fix}")
        out.append("")
        for path in (self.gpu_path, self.cpu_path):
            out.append(f"{path.name}: {path.value}")
        n = self.problems
        out.append("no problem found" if not n else f"{n} problem(s) found")
        return "\n".join(out)

    def as_json(self) -> dict:
        def path(ln: Line) -> dict:
            return {"status": ln.status, "value": ln.value}

        return {
            "ok": not self.problems,
            "arch": self.arch,
            "gpu_checked": self.gpu_checked,
            "problems": self.problems,
            "gpu_path": path(self.gpu_path),
            "cpu_path": path(self.cpu_path),
            "checks": [
                {
                    "name": ln.name,
                    "ok": ln.ok,
                    "status": ln.status,
                    "value": ln.value,
                    "fix": ln.fix,
                    "path": "gpu" if ln.gpu else "cpu",
                }
                for ln in self.lines
            ],  # fmt: skip
        }


def _informational(lines: list[Line]) -> list[Line]:
    """GPU-path problems the user cannot meet here: the same words, each fix
    as a hint the first time it comes (the GPU path's summary repeats it)."""
    out, hinted = [], set()
    for ln in lines:
        if ln.gpu and ln.status == PROBLEM:
            value = ln.value if ln.fix in hinted else f"{ln.value}; {ln.fix}"
            hinted.add(ln.fix)
            ln = info(ln.name, value, gpu=True)
        out.append(ln)
    return out


def settle(lines: list[Line], gpu_checked: bool, arch: str | None = None) -> Report:
    """The verdict: GPU-path problems stay problems only when ``gpu_checked``
    (a GPU is visible here, or the user asked: ``--gpu``, ``--arch``)."""
    if not gpu_checked:
        lines = _informational(lines)
    gpu = [ln for ln in lines if ln.gpu]
    named = {ln.name: ln for ln in gpu}
    problems = [ln.name for ln in gpu if ln.status == PROBLEM]
    missing = [n for n in ("cupy", "numba-cuda") if n in named and not named[n].ok]
    devices = [ln for ln in gpu if ln.name.startswith("gpu ") and ln.ok]
    if problems:
        g = Line(
            "GPU path", PROBLEM, f"not usable: {len(problems)} problem(s) ({', '.join(problems)})"
        )
    elif missing:
        absent = all("not installed" in named[n].value or "No module" in named[n].value
                     for n in missing)  # fmt: skip
        g = info("GPU path", f"not installed ({CU})" if absent
                 else f"not usable: {', '.join(missing)} (see above)")  # fmt: skip
    elif not devices:
        built = [ln.name for ln in gpu if ln.name.startswith("kernels (") and ln.ok]
        how = f"; kernels build ({', '.join(built)})" if built else ""
        g = info("GPU path", f"installed, no GPU visible here{how}")
    else:
        g = ok("GPU path", f"ok ({len(devices)} GPU(s))")
    own = [ln for ln in lines if not ln.gpu]
    load = next((ln for ln in own if ln.name == "cpu load"), None)
    cpu_problems = [ln.name for ln in own if ln.status == PROBLEM]
    if cpu_problems:
        c = Line("CPU path", PROBLEM, f"not usable: {len(cpu_problems)} problem(s) "
                 f"({', '.join(cpu_problems)})")  # fmt: skip
    elif load is None or not load.ok:
        c = Line("CPU path", PROBLEM, "not checked")
    else:
        c = ok("CPU path", "ok (load_sharded(device='cpu') byte-checked here: 'cpu load')")
    return Report(lines, arch, gpu_checked, g, c)


def self_check(world: int = 2) -> Line:
    """Write a tiny checkpoint with ``safetensors``, load every rank of
    ``world`` on the CPU through :func:`gpuload.load_sharded`, and compare
    every byte with numpy slicing of what ``safetensors`` reads back."""
    import numpy as np
    import safetensors.numpy

    from gpuload.load import load_sharded

    rng = np.random.default_rng(20)
    made = {  # name -> (array, split dim): Llama's MLP rules and a norm
        "model.layers.0.mlp.up_proj.weight": (rng.standard_normal((8, 6), np.float32), 0),
        "model.layers.0.mlp.down_proj.weight": (rng.standard_normal((6, 8)).astype("f2"), 1),
        "model.norm.weight": (rng.standard_normal(6, np.float32), None),
    }
    fix = "report it, with this output (gpuload doctor --json)"
    with tempfile.TemporaryDirectory(prefix="gpuload-doctor-") as tmp:
        path = os.path.join(tmp, "model.safetensors")
        safetensors.numpy.save_file({n: a for n, (a, _) in made.items()}, path)
        oracle = safetensors.numpy.load_file(path)
        wrong = []
        for rank in range(world):
            got = load_sharded(path, rank, world, device="cpu")
            for name, (_, dim) in made.items():
                full = oracle[name]
                if dim is not None:
                    per = full.shape[dim] // world
                    full = np.take(full, np.arange(rank * per, (rank + 1) * per), axis=dim)
                have = got.get(name)
                if have is None or np.ascontiguousarray(have).tobytes() != full.tobytes():
                    wrong.append(f"{name} (rank {rank})")
            del got
    if wrong:
        return bad("cpu load", f"bytes differ from safetensors + numpy: {', '.join(wrong)}", fix)
    return ok(
        "cpu load",
        f"load_sharded(device='cpu') of a {len(made)}-tensor checkpoint at world {world}: "
        "every byte matches safetensors + numpy slicing",
    )


__all__ = ["CU", "Line", "Report", "bad", "check", "info", "ok", "settle"]
