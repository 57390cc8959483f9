"""Run by test_distributed.py under torchrun (2 ranks, gloo): rank and world
come from the process group when load_sharded / Loader.load omit them."""

import sys

import torch.distributed as dist

import gpuload


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # random bytes: NaNs among them, so compare bytes, not values
        assert a[name].shape == b[name].shape and a[name].tobytes() == b[name].tobytes(), name


def main(path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    explicit = gpuload.load_sharded(path, rank, world, device="cpu")
    same(gpuload.load_sharded(path, device="cpu"), explicit)
    with gpuload.Loader(device="cpu") as loader:
        same(loader.load(path), explicit)
    # A tensor-parallel group of its own: rank 1 alone, rank 0 outside it.
    solo = dist.new_group([1])
    if rank == 1:
        same(gpuload.load_sharded(path, group=solo, device="cpu"), gpuload.load_sharded(path, 0, 1))
    else:
        try:
            gpuload.load_sharded(path, group=solo, device="cpu")
        except ValueError as e:
            # torch hands a non-member the placeholder -100: the message
            # says what it means instead of printing it (issue 23)
            assert "not a member" in str(e) and "-100" not in str(e), e
        else:
            raise AssertionError("a process outside group= loaded")
    try:  # a given rank the group contradicts
        gpuload.load_sharded(path, rank=1 - rank, device="cpu", group=dist.group.WORLD)
    except ValueError as e:
        assert "process group says rank" in str(e), e
    else:
        raise AssertionError("a contradicted rank loaded")
    dist.barrier()
    if rank == 0:
        print("ranks ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
