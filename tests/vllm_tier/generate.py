"""Greedy ids from vLLM's ``LLM``, one engine after another in one process.

    python tests/vllm_tier/generate.py OUT.json --tp 2 auto=DIR gpuload=DIR ...

Each job ``FORMAT=DIR`` starts an ``LLM`` on DIR with ``load_format=FORMAT``,
generates greedily from a fixed prompt and shuts the engine down. Writes
``{format: {dir: [ids]}}`` to OUT.json. vLLM starts its workers with spawn
(or fork), so everything runs under the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

PROMPT = [1, 2, 3, 4, 5]
NEW_TOKENS = 8


def generate(model: str, tp: int, load_format: str, extra: dict | None) -> list[int]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model,
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="bfloat16",
        max_model_len=128,
        tensor_parallel_size=tp,
        load_format=load_format,
        model_loader_extra_config=(extra or {}) if load_format == "gpuload" else {},
        seed=0,
        # On the CPU this is the share of host memory vLLM checks is free
        # at start; the KV cache is VLLM_CPU_KVCACHE_SPACE GiB.
        gpu_memory_utilization=0.25,
    )
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)
    ids = list(out[0].outputs[0].token_ids)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return ids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("jobs", nargs="+", help="FORMAT=DIR")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--extra", type=json.loads, default=None, help="gpuload's extra config")
    a = p.parse_args()
    result: dict[str, dict[str, list[int]]] = {}
    for job in a.jobs:
        fmt, model = job.split("=", 1)
        t0 = time.perf_counter()
        result.setdefault(fmt, {})[model] = generate(model, a.tp, fmt, a.extra)
        took = time.perf_counter() - t0
        print(f"GENERATED {model} tp={a.tp} {fmt} in {took:.1f} s", flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
