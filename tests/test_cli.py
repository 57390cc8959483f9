"""The command line: inspect, plan, demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import write_tensors

from gpuload import synth
from gpuload.cli.main import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return synth.write_model(tmp_path_factory.mktemp("cli") / "m", "tiny", num_files=2)


def test_inspect_table_and_json(model, capsys):
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in out and "BF16" in out
    assert main(["inspect", str(model), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["files"]) == 2 and doc["config"]["model_type"] == "llama"
    t = {x["name"]: x for x in doc["tensors"]}["model.embed_tokens.weight"]
    assert t["dtype"] == "BF16" and t["bytes"] == 2 * t["shape"][0] * t["shape"][1]


def test_plan_reports_rank_bytes_and_ops(model, capsys):
    assert main(["plan", str(model), "--rank", "1", "--world", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = doc["summary"]
    assert s["bytes_useful"] < s["file_bytes"] and s["read_ops"] == len(doc["ops"])
    o = {t["name"]: t for t in doc["tensors"]}["model.layers.0.self_attn.o_proj.weight"]
    assert o["split"] == "column" and o["rank_bytes"] * 4 == o["tensor_bytes"]
    assert main(["plan", str(model), "--rank", "0", "--world", "2", "--ops"]) == 0
    assert "staged" in capsys.readouterr().out


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpuload: error:") and "bad.safetensors" in err
    assert main(["plan", str(bad), "--rank", "3", "--world", "2"]) == 2


def test_demo_passes(tmp_path, capsys):
    assert main(["demo", "--device", "cpu", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "demo passed" in out and "all bytes match" in out


# -- the `gpuload` command as a user runs it (issue 11) -------------------------


def _gpuload(*args, env=None, **kw):
    e = {k: v for k, v in os.environ.items() if not k.startswith("GPULOAD_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gpuload", *map(str, args)],
        capture_output=True,
        text=True,
        env=e,
        **kw,
    )


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return synth.write_model(tmp_path_factory.mktemp("cli-moe") / "m", "tiny-mixtral")


@pytest.mark.parametrize("world", ["0", "-1", "x"])
def test_demo_refuses_a_bad_world(world, tmp_path):
    r = _gpuload("demo", "--device", "cpu", "--world", world, "--dir", tmp_path)
    assert r.returncode == 2 and "--world" in r.stderr and "demo passed" not in r.stdout


def test_plan_bad_include_regex_is_a_one_line_error(model):
    r = _gpuload("plan", model, "--rank", "0", "--world", "2", "--include", "(")
    assert r.returncode == 2
    assert r.stderr.startswith("gpuload: error:") and "Traceback" not in r.stderr


def test_unknown_flag_fails_every_command_at_start(model):
    for args in (["inspect", model], ["plan", model, "--rank", "0", "--world", "2"]):
        r = _gpuload(*args, env={"GPULOAD_FOO": "1"})
        assert r.returncode == 2 and "GPULOAD_FOO" in r.stderr, args


def test_inspect_into_a_closed_pipe_is_quiet(model):
    # `gpuload inspect m | head -1`, made deterministic: the reader is gone
    # before the first write (with a live reader, a small table can fit the
    # pipe's buffer before it leaves, and nothing breaks).
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(
            [sys.executable, "-m", "gpuload", "inspect", str(model)],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.returncode == 141  # as if killed by SIGPIPE, the way `head` expects


@pytest.mark.parametrize("cmd", [[], ["inspect"], ["plan"], ["demo"], ["bench"]])
def test_help_has_no_markup(cmd):
    r = _gpuload(*cmd, "--help")
    assert r.returncode == 0 and "``" not in r.stdout


def test_demo_on_an_unusable_device_writes_nothing(tmp_path):
    # cuda:4096: no machine has it, so this fails with or without a GPU
    r = _gpuload("demo", "--device", "cuda:4096", "--dir", tmp_path)
    assert r.returncode == 2 and "cuda:4096" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_plan_without_config_takes_expert_count_and_resident(moe, tmp_path):
    bare = tmp_path / "bare"  # the checkpoint without its config.json
    bare.mkdir()
    for f in moe.glob("*.safetensors*"):
        (bare / f.name).write_bytes(f.read_bytes())
    args = ["plan", bare, "--rank", "0", "--world", "2", "--json"]
    heads = ("--num-heads", "8", "--num-kv-heads", "4")  # kv heads default to heads: 8 is wrong
    r = _gpuload(*args, "--expert-parallel", "--num-heads", "8")
    assert r.returncode == 2 and "head counts do not match the tensors" in r.stderr
    r = _gpuload(*args, "--expert-parallel", *heads)
    assert r.returncode == 2 and "pass --num-experts or provide config.json" in r.stderr
    r = _gpuload(*args, "--expert-parallel", "--num-experts", "4", *heads)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["summary"]["skipped"]  # the other rank's experts
    r = _gpuload(*args, "--cpu-resident", "--num-heads", "8", "--num-kv-heads", "4")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["summary"]
    assert s["cpu_resident"] and all(".experts." in n for n in s["cpu_resident"])
    assert s["bytes_gap"] <= s["bytes_useful"] // 4
    r = _gpuload(*args, "--qkv-sections", "1,2")
    assert r.returncode == 2 and "--qkv-sections" in r.stderr


def test_fifo_named_to_inspect_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    r = _gpuload("inspect", fifo, timeout=60)
    assert r.returncode == 2 and "not a regular file" in r.stderr


# -- errors name the command's flags, not the Python keywords (issue 20) --------


def test_plan_errors_name_the_cli_flags(tmp_path):
    import numpy as np

    from gpuload import load_sharded
    from gpuload.errors import ShardingError

    f = write_tensors(
        tmp_path / "m.safetensors",
        {"model.layers.0.mlp.up_proj.weight": np.zeros((8, 4), np.float32)},
        {"model.layers.0.mlp.up_proj.weight": "F32"},
    )
    r = _gpuload("plan", f, "--rank", "0", "--world", "3")
    assert r.returncode == 2, r.stderr
    assert "does not divide evenly by world size 3; pass --allow-uneven for" in r.stderr
    assert "allow_uneven" not in r.stderr
    assert _gpuload("plan", f, "--rank", "0", "--world", "3", "--allow-uneven").returncode == 0
    # The Python API still names its keyword.
    with pytest.raises(ShardingError, match="pass allow_uneven=True for") as e:
        load_sharded(f, 0, 3, device="cpu")
    assert e.value.keywords == ("allow_uneven=True",)

    q = write_tensors(
        tmp_path / "q.safetensors",
        {"model.layers.0.self_attn.q_proj.weight": np.zeros((8, 4), np.float32)},
        {"model.layers.0.self_attn.q_proj.weight": "F32"},
    )
    r = _gpuload("plan", q, "--rank", "0", "--world", "2")
    assert r.returncode == 2 and "pass --num-heads (and --num-kv-heads) or" in r.stderr, r.stderr
    assert "num_heads=" not in r.stderr


def test_demo_on_the_cpu_prints_only_what_applies(tmp_path):
    r = _gpuload("demo", "--device", "cpu", "--dir", tmp_path, timeout=300)
    assert r.returncode == 0 and "demo passed" in r.stdout, r.stdout + r.stderr
    assert r.stdout.count("read / gather / wait s") == 2  # one table per rank
    for gpu_only in ("PCIe", "gathers", "h2d", "pack s", "gather=pack"):
        assert gpu_only not in r.stdout, (gpu_only, r.stdout)
