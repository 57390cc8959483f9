"""gpuload.torch.load_into: DTensor local shards as boxes, read alone.

The box math is held to torch's own ``_compute_local_shape_and_global_offset``;
the 2-D mesh (FSDP x tensor parallel, 4 ranks) runs under torchrun and
compares every local shard with ``distribute_tensor`` of the full tensor.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.tensor import Replicate, Shard  # noqa: E402
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402

import gpuload.torch as gt  # noqa: E402
from gpuload import ShardingError  # noqa: E402
from gpuload.integrations.torch.boxes import box_read, local_box  # noqa: E402
from gpuload.read.open import open_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_gloo_available(), reason="torch built without gloo")


def _cases(seed: int = 0, n: int = 400):
    """Random shapes (sizes 0..9, uneven and empty chunks), meshes and placements."""
    rnd = random.Random(seed)
    for _ in range(n):
        shape = tuple(rnd.randint(0, 9) for _ in range(rnd.randint(1, 3)))
        mesh = tuple(rnd.randint(1, 4) for _ in range(rnd.randint(1, 3)))
        placements = [
            Shard(rnd.randrange(len(shape))) if rnd.random() < 0.7 else Replicate() for _ in mesh
        ]
        yield shape, mesh, placements
    # FSDP2 over tensor parallelism on one dim: strided on dp, shard on tp.
    for rows, dp, tp in itertools.product((8, 12, 7, 3), (2, 3), (2, 4)):
        yield (rows, 5), (dp, tp), [_StridedShard(0, split_factor=tp), Shard(0)]


def test_local_box_matches_torch():
    checked = 0
    for shape, mesh, placements in _cases():
        for coord in itertools.product(*(range(k) for k in mesh)):
            want_shape, want_offset = _compute_local_shape_and_global_offset(
                shape, mesh, list(coord), placements
            )
            box = local_box("t", shape, mesh, coord, placements)
            assert tuple(b - a for a, b in box) == tuple(want_shape), (shape, mesh, placements)
            # torch reports offset 0 ... or the dim size for an empty shard
            for (a, b), off, n in zip(box, want_offset, shape, strict=True):
                assert a == off or (a == b and off in (a, n)), (shape, mesh, placements, coord)
            checked += 1
    assert checked > 1000


def test_partial_and_strided_rows_are_refused():
    from torch.distributed.tensor import Partial

    with pytest.raises(ShardingError, match="holds no slice"):
        local_box("w", (4, 4), (2,), (0,), [Partial()])
    # Strided rows that no later mesh dim closes: not one box.
    with pytest.raises(ShardingError, match="non-contiguous"):
        local_box("w", (8, 4), (2,), (0,), [_StridedShard(0, split_factor=2)])


def test_box_read_limits(tmp_path):
    save_file({"e": torch.zeros(2, 6, 8)}, tmp_path / "m.safetensors")
    info = open_checkpoint(tmp_path / "m.safetensors").tensors["e"]
    slab, sel = box_read(info, ((1, 2), (0, 6), (2, 6)))  # one expert, columns 2..6
    assert slab.shape == (1, 6, 8) and slab.start == info.start + 6 * 8 * 4
    assert (sel.dim, sel.ranges, sel.shape) == (2, ((2, 4),), (1, 6, 4))
    with pytest.raises(ShardingError, match="cut on dims"):
        box_read(info, ((0, 2), (0, 3), (2, 6)))  # dims 1 and 2 behind a full dim 0


def test_meta_transformers_model_tied(tmp_path):
    """A meta-device transformers model (tied embeddings) equals from_pretrained."""
    pytest.importorskip("transformers")
    from tiny_models import quiet, write_model

    where = write_model("qwen3", tmp_path)
    with quiet():
        import transformers

        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.AutoConfig.from_pretrained(where)
            )
        ref = transformers.AutoModelForCausalLM.from_pretrained(where)
    report = gt.load_into(model, where)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert report.bytes_read == report.file_bytes and not report.missing


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2, bias=False)


def test_names_strict_and_dtype(tmp_path):
    full = {"x.weight": torch.randn(3, 4), "x.bias": torch.randn(3), "b.weight": torch.randn(2, 3)}
    full["stray"] = torch.ones(1)
    path = tmp_path / "m.safetensors"
    save_file(full, path)
    mod = _Two()
    with pytest.raises(RuntimeError, match=r"unexpected keys \['stray'\]"):
        gt.load_into(mod, path, name_map={"a.weight": "x.weight", "a.bias": "x.bias"})
    with pytest.raises(RuntimeError, match=r"missing keys \['a.weight', 'a.bias'\]"):
        gt.load_into(mod, path)
    report = gt.load_into(mod, path, name_map=lambda k: k.replace("a.", "x."), strict=False)
    assert report.unexpected == ["stray"] and report.missing == []
    assert torch.equal(mod.a.weight, full["x.weight"]) and torch.equal(
        mod.b.weight, full["b.weight"]
    )
    half = _Two().to(torch.float16)
    with pytest.raises(TypeError, match="cast=True"):
        gt.load_into(half, path, name_map=lambda k: k.replace("a.", "x."), strict=False)
    gt.load_into(half, path, name_map=lambda k: k.replace("a.", "x."), strict=False, cast=True)
    assert torch.equal(half.a.weight, full["x.weight"].half())


def test_cpu_parameters_are_filled_in_place(tmp_path, monkeypatch):
    """On the CPU the reads land in the module's own tensors: the parameters
    keep their storage, and no result buffer is allocated for them."""
    import gpuload.host.backend as gb

    full = {"a.weight": torch.randn(300, 400), "a.bias": torch.randn(300)}
    full["b.weight"] = torch.randn(2, 300).half()  # stored half, module float: a cast copy
    path = tmp_path / "m.safetensors"
    save_file(full, path)
    mod = nn.Module()
    mod.a, mod.b = nn.Linear(400, 300), nn.Linear(300, 2, bias=False)
    ptrs = {k: v.data_ptr() for k, v in mod.state_dict().items()}
    made = []
    real = gb.host_result
    monkeypatch.setattr(
        gb, "host_result", lambda n, name, *a, **k: made.append(name) or real(n, name, *a, **k)
    )
    report = gt.load_into(mod, path, cast=True)
    assert made == ["b.weight"]  # only the tensor that needs a cast got a buffer
    assert {k: v.data_ptr() for k, v in mod.state_dict().items()} == ptrs
    assert torch.equal(mod.a.weight, full["a.weight"]) and torch.equal(mod.a.bias, full["a.bias"])
    assert torch.equal(mod.b.weight, full["b.weight"].float())
    assert report.bytes_read == report.file_bytes


def test_into_buffers_are_checked_before_any_read(tmp_path):
    import numpy as np

    import gpuload
    from gpuload.errors import PlanError

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    with gpuload.Loader(device="cpu") as ld:
        for bad in (
            np.zeros(63, np.uint8),
            np.zeros(16, np.float32),
            np.zeros(64, np.uint8)[::1][::-1],
        ):
            with pytest.raises(PlanError, match="into"):
                ld._load(path, 0, 1, into={"w": bad})
        out = np.zeros(64, np.uint8)
        got = ld._load(path, 0, 1, into={"w": out})
        assert np.shares_memory(got["w"], out) and (got["w"] == 1).all()


def test_2d_mesh_fsdp_times_tp(tmp_path):
    """4 ranks on a 2 x 2 (dp, tp) mesh: explicit placements (2-D boxes, nested,
    uneven, empty, 3-D, bf16), a meta MLP under parallelize_module + fully_shard,
    and transformers 5 fused experts built from per-expert tensors."""
    from tiny_models import ROOT, free_port

    g = torch.Generator().manual_seed(0)
    shapes = {
        "a": (8, 12),
        "b": (7, 5),
        "c": (3, 10),
        "d": (1, 9),
        "e": (2, 3),
        "f": (4, 6, 8),
        "g": (5,),
        "h": (6, 4),
        "i": (8, 8),
        "mlp.up.weight": (16, 8),
        "mlp.up.bias": (16,),
        "mlp.down.weight": (8, 16),
        "mlp.down.bias": (8,),
        # per-expert tensors for fused gate_up_proj [4, 10, 6] / down_proj [4, 6, 5]
        **{
            f"moe.experts.{e}.{p}.weight": (5, 6)
            for e in range(4)
            for p in ("gate_proj", "up_proj")
        },
        **{f"moe.experts.{e}.down_proj.weight": (6, 5) for e in range(4)},
    }
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tensors["i"] = tensors["i"].bfloat16()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=4",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        str(ROOT / "tests" / "dist_load_into.py"),
        str(path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    ranks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    for r in ranks:
        assert r["failures"] == [], r
        # each rank read its shards, not the file (plus a few covering gaps)
        assert r["bytes_read"] < r["file_bytes"], r


def test_name_map_two_keys_to_one_name_loads_both(tmp_path):
    """A tied checkpoint (no lm_head.weight) into an untied meta Qwen3 with
    lm_head.weight mapped to the embeddings: both parameters get its bytes
    (issue 23: only one did, the other kept uninitialised memory)."""
    pytest.importorskip("transformers")
    from tiny_models import quiet, write_model

    where = write_model("qwen3", tmp_path)  # tied: the file has no lm_head.weight
    assert "lm_head.weight" not in open_checkpoint(where).tensors
    with quiet():
        import transformers

        config = transformers.AutoConfig.from_pretrained(where)
        config.tie_word_embeddings = False
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():  # garbage a missed copy would leave behind
        model.to_empty(device="cpu")
        model.model.embed_tokens.weight.fill_(7.0)
        model.lm_head.weight.fill_(7.0)
    report = gt.load_into(
        model, where, name_map={"lm_head.weight": "model.embed_tokens.weight"}, strict=True
    )
    want = save_load_reference(where, "model.embed_tokens.weight")
    assert torch.equal(model.model.embed_tokens.weight, want)
    assert torch.equal(model.lm_head.weight, want)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert report.missing == [] and report.unexpected == []


def test_name_map_one_name_to_two_plain_parameters(tmp_path):
    """Two untied plain parameters mapped to one name both get its bytes."""
    path = tmp_path / "m.safetensors"
    save_file({"x.weight": torch.randn(4, 4)}, path)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(4, 4))
            self.b = nn.Parameter(torch.zeros(4, 4))

    mod = Pair()
    report = gt.load_into(mod, path, name_map=lambda k: "x.weight")
    want = save_load_reference(path, "x.weight")
    assert torch.equal(mod.a, want) and torch.equal(mod.b, want) and not report.missing


def save_load_reference(where, name):
    from safetensors import safe_open

    files = [where] if str(where).endswith(".safetensors") else sorted(where.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as h:
            if name in set(h.keys()):
                return h.get_tensor(name)
    raise KeyError(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA")
def test_device_cuda_without_cuda_refused_before_materializing(tmp_path):
    """A CPU-only torch: a clear GpuloadError, the meta module untouched
    (it was torch's AssertionError after materializing had started)."""
    from gpuload import BackendUnavailable

    path = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3)}, path)
    with torch.device("meta"):
        mod = nn.Sequential()
        mod.a = nn.Linear(4, 3)
    with pytest.raises(BackendUnavailable, match="no CUDA"):
        gt.load_into(mod, path, device="cuda")
    assert mod.a.weight.is_meta and mod.a.bias.is_meta


MOE = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    ),
}


def _moe_model(family, where):
    import transformers
    from tiny_models import COMMON, quiet

    with quiet():
        cls, extra = MOE[family]
        config = getattr(transformers, cls)(**{**COMMON, **extra})
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(where)
    return config


@pytest.mark.parametrize("family", sorted(MOE))
def test_fused_moe_experts_from_per_expert_checkpoint(tmp_path, family):
    """transformers 5 keeps experts fused (mlp.experts.gate_up_proj [E, 2I, H],
    down_proj [E, H, I]) and saves them per expert: load_into applies its
    conversion and matches from_pretrained, parameters and logits."""
    transformers = pytest.importorskip("transformers")
    from tiny_models import quiet

    config = _moe_model(family, tmp_path)
    names = open_checkpoint(tmp_path).tensors
    assert any(".experts.0." in n for n in names)  # per expert on disk
    with quiet():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert any(k.endswith("experts.gate_up_proj") for k in model.state_dict())
    report = gt.load_into(model, tmp_path, strict=True)
    assert report.missing == [] and report.unexpected == []
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    # Non-persistent buffers (rotary frequencies) are not in any checkpoint:
    # recomputed from the config as from_pretrained does (examples/fsdp2_generate.py)
    for module in model.modules():
        if "inv_freq" in dict(module.named_buffers(recurse=False)):
            fresh = type(module)(module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buf)
    ids = torch.tensor([[1, 5, 9, 33, 77, 101]])
    with torch.no_grad():
        got_logits, want_logits = model.eval()(ids).logits, ref.eval()(ids).logits
    # identical parameters; float32 kernels may still sum in another order
    assert torch.allclose(got_logits, want_logits, rtol=0, atol=1e-5)
    assert torch.equal(got_logits.argmax(-1), want_logits.argmax(-1))


def test_fused_moe_experts_local_box_reads_only_its_rows(tmp_path):
    """A Shard(1)-like local box of gate_up_proj (rows of gate and up) and of
    down_proj (columns): the pieces read exactly the rows and columns of the
    per-expert tensors that box covers."""
    from gpuload.integrations.torch.fused import fused_sources, pieces

    projs = ("gate_proj", "up_proj")
    names = {f"m.layers.0.mlp.experts.{e}.{p}.weight" for e in range(3) for p in projs}
    sources, kind = fused_sources("m.layers.0.mlp.experts.gate_up_proj", names)
    assert kind == "gate_up" and len(sources) == 3
    # global [3, 8, 5]: I = 4; rows 2..6 = gate rows 2..4 and up rows 0..2
    got = pieces(sources, kind, ((1, 3), (2, 6), (0, 5)), (3, 8, 5))
    assert [(p.source.split("experts.")[1], p.box, p.dest) for p in got] == [
        ("1.gate_proj.weight", ((2, 4), (0, 5)), (0, slice(0, 2))),
        ("1.up_proj.weight", ((0, 2), (0, 5)), (0, slice(2, 4))),
        ("2.gate_proj.weight", ((2, 4), (0, 5)), (1, slice(0, 2))),
        ("2.up_proj.weight", ((0, 2), (0, 5)), (1, slice(2, 4))),
    ]
