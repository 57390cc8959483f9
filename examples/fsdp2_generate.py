"""FSDP2 greedy generation: a transformers model on the meta device, sharded by
``fully_shard``, filled by ``gpuload.torch.load_into``.

    torchrun --nproc-per-node W examples/fsdp2_generate.py MODEL_DIR \\
        --prompt-ids 1,2,3 --max-new-tokens 16 [--device cpu|cuda] [--dtype float32]

The model is built from config.json on the ``meta`` device (no memory),
``fully_shard`` wraps each decoder layer and then the root over all ranks,
and ``load_into`` gives every parameter's local shard (its dim-0 chunk) the
bytes of that chunk alone, read from the checkpoint by this rank. Greedy
decoding of exactly ``--max-new-tokens`` tokens, no stop at EOS; rank 0
prints the new ids as a JSON list on its last line of standard output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import gpuload.torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tp_generate import init, parse_args  # noqa: E402  (the same arguments)


def build(model_dir: Path, dtype: torch.dtype, device: str, world: int):
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    mesh = init_device_mesh(device.split(":")[0], (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report = gpuload.torch.load_into(model, model_dir, device=device, cast=True)
    # Non-persistent buffers (rotary frequencies) are not in the checkpoint:
    # recompute them from the config, as from_pretrained would.
    for module in model.modules():
        if "inv_freq" in dict(module.named_buffers(recurse=False)):
            fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buf)
    return model.eval(), report


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = init(args.device)
    try:
        model, report = build(args.model_dir, getattr(torch, args.dtype), device, world)
        print(f"rank {rank}: {report.summary()}", file=sys.stderr)
        ids = torch.tensor([args.prompt], device=device)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(args.max_new_tokens):  # every rank runs the same steps
                logits = model(ids, use_cache=False).logits[0, -1]
                token = int(logits.argmax())
                new.append(token)
                ids = torch.cat((ids, torch.tensor([[token]], device=device)), dim=1)
        if rank == 0:
            print(json.dumps(new), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
