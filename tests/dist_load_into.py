"""Run by test_torch_load_into.py under torchrun: 4 ranks (gloo) on a 2 x 2
mesh ("dp", "tp"). Loads DTensor parameters with gpuload.torch.load_into and
compares every local shard with distribute_tensor of the full tensor."""

import json
import sys

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import gpuload.torch as gt

# name -> placements on the ("dp", "tp") mesh; shapes in test_torch_load_into.py
PLACEMENTS = {
    "a": (Shard(0), Shard(1)),  # rows by dp, columns by tp: a 2-D box
    "b": (Shard(0), Shard(0)),  # nested, uneven: 7 -> 4 | 3 -> 2 2 | 2 1
    "c": (Shard(1), Shard(0)),  # columns by dp, rows (3: 2 | 1) by tp
    "d": (Replicate(), Shard(1)),
    "e": (Shard(0), Shard(0)),  # 2 rows over 4 ranks: two ranks hold nothing
    "f": (Shard(0), Shard(2)),  # 3-D: experts by dp, input features by tp
    "g": (Shard(0), Replicate()),
    "i": (Shard(1), Shard(1)),  # bf16
}


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def check(name, param, full, failures):
    local = param.to_local() if isinstance(param, DTensor) else param
    if isinstance(param, DTensor):
        if not any(type(p).__name__ == "_StridedShard" for p in param.placements):
            want = distribute_tensor(full, param.device_mesh, param.placements).to_local()
            if not torch.equal(local, want):
                failures.append(f"{name}: local shard differs from distribute_tensor")
        if not torch.equal(param.full_tensor(), full):
            failures.append(f"{name}: full_tensor differs")
    elif not torch.equal(local, full):
        failures.append(f"{name}: plain tensor differs")


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    full = load_file(path)  # the oracle: safetensors reads every tensor
    failures: list[str] = []

    # Already-allocated DTensor parameters with explicit placements, and a plain one.
    holder = nn.Module()
    for name, placements in PLACEMENTS.items():
        zeros = torch.zeros_like(full[name])
        holder.register_parameter(name, nn.Parameter(distribute_tensor(zeros, mesh, placements)))
    holder.register_parameter("h", nn.Parameter(torch.zeros_like(full["h"])))
    report = gt.load_into(holder, path, strict=False)
    for name, param in holder.named_parameters():
        check(name, param, full[name], failures)
    local_bytes = sum(
        (p.to_local() if isinstance(p, DTensor) else p).nbytes for p in holder.parameters()
    )
    if report.bytes_useful != local_bytes:
        failures.append(f"delivered {report.bytes_useful} bytes, local shards {local_bytes}")

    # FSDP x TP on the meta device: colwise/rowwise TP on "tp", FSDP2 on "dp".
    with torch.device("meta"):
        mlp = Mlp()
    parallelize_module(mlp, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(mlp, mesh=mesh["dp"])
    mlp_report = gt.load_into(mlp, path, name_map=lambda key: "mlp." + key, strict=False)
    for name, param in mlp.named_parameters():
        check(name, param, full["mlp." + name], failures)
    # The loaded FSDP x TP module computes what the plain one does.
    plain = Mlp()
    plain.load_state_dict({k[4:]: v for k, v in full.items() if k.startswith("mlp.")})
    x = torch.arange(24, dtype=torch.float32).reshape(3, 8) / 10
    if not torch.allclose(mlp(x), plain(x), atol=1e-5):
        failures.append("FSDP x TP forward differs from the plain module")

    # transformers 5 fused experts from per-expert tensors (gpuload.integrations.torch.fused):
    # experts by dp, gate_up rows (gate | up) and down's input columns by tp.
    n_exp = sum(1 for k in full if k.startswith("moe.experts.") and k.endswith(".gate_proj.weight"))
    fused = {
        "gate_up_proj": torch.stack(
            [
                torch.cat(
                    [
                        full[f"moe.experts.{e}.gate_proj.weight"],
                        full[f"moe.experts.{e}.up_proj.weight"],
                    ]
                )
                for e in range(n_exp)
            ]
        ),
        "down_proj": torch.stack([full[f"moe.experts.{e}.down_proj.weight"] for e in range(n_exp)]),
    }
    experts = nn.Module()
    for name, placements in (
        ("gate_up_proj", (Shard(0), Shard(1))),
        ("down_proj", (Shard(0), Shard(2))),
    ):
        zeros = torch.zeros_like(fused[name])
        experts.register_parameter(name, nn.Parameter(distribute_tensor(zeros, mesh, placements)))
    moe = nn.Module()
    moe.experts = experts
    moe_report = gt.load_into(moe, path, name_map=lambda key: "moe." + key, strict=False)
    for name, param in experts.named_parameters():
        check(f"experts.{name}", param, fused[name], failures)
    local = sum(p.to_local().nbytes for p in experts.parameters())
    if moe_report.bytes_useful != local:
        failures.append(f"fused experts: delivered {moe_report.bytes_useful} bytes, local {local}")

    result = {
        "rank": rank,
        "failures": failures,
        "bytes_read": report.bytes_read + mlp_report.bytes_read,
        "file_bytes": report.file_bytes,
        "placements": {n: str(p.placements) for n, p in mlp.named_parameters()},
    }
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, result)
    if rank == 0:
        print(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
