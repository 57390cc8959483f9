"""Header parsing and planning time for a checkpoint of DeepSeek-V3's shape.

The files hold real headers (61 layers, 256 routed experts each, FP8 block
scales beside every expert weight: 94,367 tensors over 16 files) and a data
section that is a hole (``truncate``): nothing is read or written but the
headers, so this times gpuload's own work before any I/O. Dimensions are
tiny; the count of tensors is what costs.

    python bench/plan_scale.py [--world 8] [--runs 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import gpuload

LAYERS, EXPERTS, HIDDEN, INTER, HEADS = 61, 256, 64, 32, 8


def tensors() -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.self_attn.q_a_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.q_b_proj.weight", (HEADS * 32, HIDDEN)),
            (f"{p}.self_attn.kv_a_proj_with_mqa.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.kv_b_proj.weight", (HEADS * 32, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * 32)),
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)),
            (f"{p}.mlp.shared_experts.gate_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.shared_experts.up_proj.weight", (INTER, HIDDEN)),
            (f"{p}.mlp.shared_experts.down_proj.weight", (HIDDEN, INTER)),
        ]
        for e in range(EXPERTS):
            for proj, shape in (
                ("gate_proj", (INTER, HIDDEN)),
                ("up_proj", (INTER, HIDDEN)),
                ("down_proj", (HIDDEN, INTER)),
            ):
                out.append((f"{p}.mlp.experts.{e}.{proj}.weight", shape))
                out.append((f"{p}.mlp.experts.{e}.{proj}.weight_scale_inv", (1, 1)))
    return out


def write(root: Path, files: int = 16) -> int:
    names = tensors()
    weight_map = {}
    for k in range(files):
        fname = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        header, pos = {}, 0
        for name, shape in names[k::files]:
            n = 1
            for d in shape:
                n *= d
            offsets = [pos, pos + n]
            header[name] = {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": offsets}
            weight_map[name] = fname
            pos += n
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
            f.truncate(8 + len(text) + pos)  # the data: a hole
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {
        "model_type": "deepseek_v3",
        "num_attention_heads": HEADS,
        "n_routed_experts": EXPERTS,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    (root / "config.json").write_text(json.dumps(config))
    return len(names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write the headers (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        count = write(Path(d))
        times: dict[str, list[float]] = {"open_checkpoint": [], "plan TP": [], "plan EP": []}
        for _ in range(args.runs):
            t0 = time.perf_counter()
            ckpt = gpuload.open_checkpoint(d)
            t1 = time.perf_counter()
            ld = gpuload.Loader(device="cpu")
            tp = ld.plan(ckpt, 0, args.world)
            t2 = time.perf_counter()
            ld.plan(ckpt, 0, args.world, expert_parallel=True)
            t3 = time.perf_counter()
            times["open_checkpoint"].append(t1 - t0)
            times["plan TP"].append(t2 - t1)
            times["plan EP"].append(t3 - t2)
        print(f"{count:,} tensors in {len(ckpt.files)} files; rank 0 of world {args.world}")
        print(f"TP plan: {len(tp.plan.tensors):,} tensors, {len(tp.plan.ops):,} reads")
        print("| stage | median s | runs |\n|---|---|---|")
        for stage, v in times.items():
            runs = " ".join(f"{x:.2f}" for x in v)
            print(f"| {stage} | {statistics.median(v):.2f} | {runs} |")


if __name__ == "__main__":
    main()
