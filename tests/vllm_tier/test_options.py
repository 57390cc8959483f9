"""What the plug-in refuses, before any weight is written, and what it keeps
out of ``import gpuload``."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tier import env

from gpuload.integrations import vllm as plugin

pytestmark = pytest.mark.timeout(600)
HERE = Path(__file__).resolve().parent


def test_extra_config_is_checked_by_the_option_table():
    assert plugin.settings({"threads": 3, "prefetch": False}) == {"threads": 3, "prefetch": False}
    with pytest.raises(TypeError, match="did you mean 'threads'"):
        plugin.settings({"threds": 3})
    # Sharding comes from vLLM's model: a caller's would cut other shards.
    with pytest.raises(TypeError, match="'num_heads' is a sharding option"):
        plugin.settings({"num_heads": 4})
    with pytest.raises(ValueError, match="threads"):
        plugin.settings({"threads": 0})


def test_import_gpuload_stays_free_of_vllm():
    code = "import gpuload, sys; print(sorted(m for m in sys.modules if m.startswith('vllm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_unsupported_architecture_fails_before_loading(tmp_path):
    """GPT-2 is not among the checked families: the engine does not start,
    and the error names it and the way out."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        config = transformers.GPT2Config(n_embd=128, n_layer=1, n_head=4, vocab_size=128)
        transformers.GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    out = tmp_path / "ids.json"
    cmd = [sys.executable, str(HERE / "generate.py"), str(out), f"gpuload={tmp_path / 'm'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=env(1))
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not out.exists()
    assert "does not support architecture GPT2LMHeadModel" in log, log[-4000:]
    assert "--load-format auto" in log
    assert "gpuload: rank" not in log  # nothing was read


def test_the_entry_point_names_the_plugin():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "gpuload"]
    assert ep.value == "gpuload.integrations.vllm:register"
    assert ep.load() is plugin.register
