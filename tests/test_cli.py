"""The command line: inspect, plan, demo."""

from __future__ import annotations

import json

import pytest

from gpuload import synth
from gpuload.cli import main


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
