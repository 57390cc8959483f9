"""How the vLLM tier runs vLLM: environment, the generate.py run, report lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# gpuload's settings travel as vLLM's model_loader_extra_config.
EXTRA = {"threads": 2, "prefetch": False}
REPORT = re.compile(
    r"gpuload: rank (\d+)/(\d+) read (\d+) of (\d+) file bytes \([^)]*\) for a shard of (\d+) "
)
# The same line's tail: the shard bytes read straight into the parameters,
# and those the writers copied.
IN_PLACE = re.compile(
    r"gpuload: rank \d+/\d+ .*? for a shard of (\d+) bytes .*?; (\d+) bytes read in place, "
    r"(\d+) copied\)"
)


def env(tp: int) -> dict[str, str]:
    """One process for the engine and fork for the TP workers: the tier
    pays vLLM's imports once a run, not once an engine (the serve test runs
    vLLM's default spawn path)."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_WORKER_MULTIPROC_METHOD": "fork",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "auto",
        "PYTHONWARNINGS": "ignore",
    }


def run(tmp: Path, tp: int, jobs: list[str], timeout: float = 900) -> tuple[dict, str]:
    out = tmp / f"ids-tp{tp}.json"
    cmd = [sys.executable, str(HERE / "generate.py"), str(out), "--tp", str(tp)]
    cmd += ["--extra", json.dumps(EXTRA), *jobs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(tp))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd}\n{log[-6000:]}"
    return json.loads(out.read_text()), log


def swap_kv_heads(src: Path, dst: Path, tensor: str) -> None:
    """A copy of ``src`` whose ``tensor`` has its two kv heads swapped: what
    each TP=2 rank would hold had the plug-in handed it the other's k_proj."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    file = dst / index["weight_map"][tensor]
    import safetensors.torch  # bfloat16: numpy has none
    import torch

    tensors = safetensors.torch.load_file(file)
    a, b = tensors[tensor].chunk(2)
    tensors[tensor] = torch.cat([b, a])
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
