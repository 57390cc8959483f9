"""Remote checkpoints over HTTP (a real server on 127.0.0.1): every rank of
worlds 1, 2, 4, 8 byte-exact, bytes counted at the server, the Hub's
resolve URLs, the CLI, and each fault of issue 22 through the public
entry points: correct bytes or a GpuloadError, never wrong bytes, a hang or
a connection left open."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import RULES, differing, expected_shards, write_matrix
from remote_server import Faults, RangeServer, replace_file
from test_device_pipeline import SMALL, mismatched
from test_device_pipeline import fake_gpu as fake_gpu  # noqa: F401  (the fixture)

import gpuload
from gpuload import synth
from gpuload.errors import GpuloadError, IndexFileError, ReadError

pytestmark = pytest.mark.timeout(120)


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(
        np.ascontiguousarray(a[n]).tobytes() == np.ascontiguousarray(b[n]).tobytes() for n in a
    )


def _no_leaks(server: RangeServer) -> None:
    assert server.wait_idle() == 0, "a connection was left open"
    assert not [t for t in threading.enumerate() if t.name.startswith("gpuload-")]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    """Every dtype x shape in two files with an index, 6 MiB of padding
    tensors so the header probes are a small part of the bytes."""
    where = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(5)
    return write_matrix(where, rng, index=True, extra={"big.row": ("F32", (24, 65536))})


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return synth.write_model(tmp_path_factory.mktemp("moe") / "m", "tiny-qwen-moe", num_files=3)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_http_every_rank_matches_oracle_and_server_bytes(matrix, world):
    dims = {"big.row": 0}
    with RangeServer(matrix) as s:
        for rank in range(world):
            before = s.quiet()
            got, rep = gpuload.load_sharded(
                s.url + "/", rank, world, device="cpu", rules=RULES, return_report=True
            )
            assert not differing(got, expected_shards(matrix, rank, world, dims))
            assert rep.backend == "remote"
            # What the server sent is what the load counted: the planned
            # reads (no retries here) plus index, header probes, config.
            assert s.quiet() - before == rep.bytes_read + rep.bytes_header
            plan = gpuload.Loader(device="cpu").plan(s.url + "/", rank, world, rules=RULES)
            # The planned reads, less what the probes' first MiB already held.
            assert plan.plan.bytes_read - 2 * (1 << 20) <= rep.bytes_read <= plan.plan.bytes_read
        _no_leaks(s)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_http_moe_matches_local_every_rank(moe, world):
    with RangeServer(moe) as s:
        for rank in range(world):
            want = gpuload.load_sharded(moe, rank, world, device="cpu")
            got = gpuload.load_sharded(s.url + "/", rank, world, device="cpu")
            assert _same(got, want)
        ep = gpuload.load_sharded(s.url + "/", 1, 2, device="cpu", expert_parallel=True)
        assert _same(ep, gpuload.load_sharded(moe, 1, 2, device="cpu", expert_parallel=True))
        _no_leaks(s)


def test_single_file_url_and_cpu_resident_and_prefault(tmp_path, rng):
    f = write_matrix(tmp_path, rng)
    with RangeServer(tmp_path) as s:
        got, rep = gpuload.load_sharded(
            f"{s.url}/model.safetensors",
            1,
            2,
            device="cpu",
            rules=RULES,
            cpu_resident=r"\.col$",
            prefault=True,
            return_report=True,
        )
        assert not differing(got, expected_shards(f, 1, 2))
        assert rep.resident_copies and all(n.endswith(".col") for n in rep.resident_copies)
        assert "does not apply" in rep.prefault.skipped_reason
        assert all(got[n].flags.writeable for n in rep.resident_copies)  # owned copies
        _no_leaks(s)


def test_hf_resolve_urls_with_token_and_revision(moe):
    repo = moe.parent / "hub" / "org" / "tiny" / "resolve" / "v1"
    repo.mkdir(parents=True)
    for p in moe.iterdir():
        shutil.copy(p, repo / p.name)
    with RangeServer(moe.parent / "hub", Faults(token="hf_secret")) as s:
        opts = {"hf_endpoint": s.url, "hf_token": "hf_secret"}
        got = gpuload.load_sharded("hf://org/tiny@v1", 0, 2, device="cpu", storage_options=opts)
        assert _same(got, gpuload.load_sharded(moe, 0, 2, device="cpu"))
        # A wrong token: a clear 403 naming the URL, never the token.
        with pytest.raises(ReadError, match=r"HTTP 403.*credentials") as e:
            gpuload.load_sharded(
                "hf://org/tiny@v1", 0, 2, device="cpu", storage_options={**opts, "hf_token": "bad"}
            )
        assert "/org/tiny/resolve/v1/" in str(e.value)
        assert "hf_secret" not in str(e.value)
        _no_leaks(s)


def test_hf_env_is_read(moe, monkeypatch):
    repo = moe.parent / "hub2" / "org" / "m" / "resolve" / "main"
    repo.mkdir(parents=True)
    for p in moe.iterdir():
        shutil.copy(p, repo / p.name)
    with RangeServer(moe.parent / "hub2") as s:
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        got = gpuload.load_sharded("hf://org/m", 1, 2, device="cpu")
        assert _same(got, gpuload.load_sharded(moe, 1, 2, device="cpu"))


def test_cli_inspect_and_plan_take_urls(moe):
    with RangeServer(moe) as s:
        run = [sys.executable, "-m", "gpuload"]
        out = subprocess.run(
            [*run, "inspect", "--json", s.url + "/"], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert len(doc["files"]) == 3 and doc["files"][0]["path"].startswith(s.url)
        out = subprocess.run(
            [*run, "plan", s.url + "/", "--world", "2", "--rank", "1"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr


# -- faults ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "503", "drop", "short", "hang"])
def test_transient_faults_end_in_correct_bytes(matrix, kind):
    with RangeServer(matrix, Faults(every=3, kind=kind)) as s:
        got, rep = gpuload.load_sharded(
            s.url + "/",
            1,
            2,
            device="cpu",
            rules=RULES,
            return_report=True,
            storage_options={"timeout": 0.5, "retries": 4},
        )
        assert not differing(got, expected_shards(matrix, 1, 2, {"big.row": 0}))
        assert s.n >= 3  # the fault was hit
        _no_leaks(s)


def test_retries_are_bounded(matrix):
    with RangeServer(matrix, Faults(every=1, kind="503", repeat=True)) as s:
        with pytest.raises(ReadError, match=r"after 3 tries: HTTP 503.*SlowDown"):
            gpuload.load_sharded(s.url + "/", 0, 2, device="cpu", storage_options={"retries": 2})
        _no_leaks(s)


@pytest.mark.parametrize("honours_if_match", [True, False])
def test_object_replaced_mid_load_raises(tmp_path, rng, honours_if_match):
    where = write_matrix(tmp_path, rng, index=True, extra={"big.row": ("F32", (24, 65536))})
    wm = json.loads((where / "model.safetensors.index.json").read_text())["weight_map"]
    name = wm["big.row"]  # the file with ranges past its probe's first MiB
    target = where / name

    def replace(n: int) -> None:
        if n == 3:  # after both header probes, before the ranges
            replace_file(target)

    faults = Faults(on_request=replace, ignore_if_match=not honours_if_match)
    with RangeServer(where, faults) as s:
        with pytest.raises(ReadError, match="changed since|replaced") as e:
            gpuload.load_sharded(s.url + "/", 0, 1, device="cpu", rules=RULES, threads=1)
        assert name in str(e.value)
        _no_leaks(s)


def test_server_ignoring_range_is_refused(matrix):
    with RangeServer(matrix, Faults(every=1, kind="ignore_range", repeat=True)) as s:
        with pytest.raises(ReadError, match="ignored Range"):
            gpuload.load_sharded(s.url + "/", 0, 2, device="cpu", rules=RULES)
        _no_leaks(s)


def test_missing_shard_names_the_url(matrix):
    with RangeServer(matrix, Faults(missing=("model-1.safetensors",))) as s:
        with pytest.raises(IndexFileError, match=r"model-1.safetensors.*HTTP 404") as e:
            gpuload.load_sharded(s.url + "/", 0, 2, device="cpu", rules=RULES)
        assert s.url in str(e.value)
        with pytest.raises(FileNotFoundError, match="no model.safetensors"):
            gpuload.load_sharded(s.url + "/nothing/", 0, 2, device="cpu")
        _no_leaks(s)


def test_bad_header_is_a_header_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with RangeServer(tmp_path) as s, pytest.raises(GpuloadError, match="exceeds"):
        gpuload.load_sharded(s.url + "/model.safetensors", 0, 1, device="cpu")


def test_prefetch_off_and_storage_options_checked(matrix):
    with RangeServer(matrix) as s:
        got = gpuload.load_sharded(s.url + "/", 0, 2, device="cpu", rules=RULES, prefetch=False)
        assert not differing(got, expected_shards(matrix, 0, 2, {"big.row": 0}))
        with pytest.raises(TypeError, match="unknown storage_options"):
            gpuload.load_sharded(s.url + "/", 0, 2, device="cpu", storage_options={"bogus": 1})
    with pytest.raises(TypeError, match="storage_options"):
        gpuload.Loader(device="cpu", storage_options={})
    with pytest.raises(ValueError, match="storage_options is for"):
        gpuload.load_sharded(matrix, 0, 2, device="cpu", storage_options={"region": "x"})


@pytest.mark.parametrize("reader", ["posix", "kvikio"])
def test_remote_on_the_fake_gpu_pipeline(tmp_path, rng, fake_gpu, reader):  # noqa: F811
    """The device pipeline (fake CUDA runtime) takes the remote reader in
    place of posix or kvikio: pinned staging, H2D, gathers, same bytes."""
    from fake_cuda import FakeKvikio

    where = write_matrix(tmp_path, rng, index=True)
    fake_gpu(kvikio=FakeKvikio(compat=False) if reader == "kvikio" else None)
    with RangeServer(where) as s:
        with gpuload.Loader(device="cuda:0", framework="cupy", **SMALL) as ld:
            for rank in range(2):
                got, rep = ld.load(s.url + "/", rank, 2, rules=RULES, return_report=True)
                assert not mismatched(got, expected_shards(where, rank, 2))
                assert rep.backend == "remote"
        _no_leaks(s)


@pytest.mark.parametrize("prefetch", [True, False])
def test_prefetch_sends_the_next_range_ahead(matrix, prefetch):
    """One reader thread: with read-ahead the next range's GET is in flight
    while the current one is read (two at once at the server); with
    GPULOAD_PREFETCH=0 never more than one."""
    with RangeServer(matrix, Faults(delay_s=0.05)) as s:  # answers overlap
        ckpt = gpuload.open_checkpoint(s.url + "/")  # the probes run 16 at once: not counted
        s.peak = 0
        mib = 1 << 20
        with gpuload.Loader(
            device="cpu", threads=1, chunk_bytes=mib, min_chunk_bytes=mib, prefetch=prefetch
        ) as ld:
            got = ld.load(ckpt, 0, 1, rules=RULES)
        assert not differing(got, expected_shards(matrix, 0, 1, {"big.row": 0}))
        assert s.peak == (2 if prefetch else 1)
        _no_leaks(s)


def test_import_gpuload_loads_no_remote_module():
    code = (
        "import gpuload, sys; "
        "print([m for m in sys.modules if m.startswith('gpuload.read.remote')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unsupported_schemes_say_so():
    for url in ("gs://bucket/m/", "az://container/m/"):
        with pytest.raises(ValueError, match="is not supported"):
            gpuload.load_sharded(url, 0, 1, device="cpu")


def test_https_trusts_the_system_store_and_refuses_an_unknown_certificate(
    matrix, tmp_path, monkeypatch
):
    from remote_server import self_signed

    cert, key = self_signed(tmp_path)
    with RangeServer(matrix, tls=(cert, key)) as s:
        assert s.url.startswith("https://")
        with pytest.raises(ReadError, match="certificate not trusted"):
            gpuload.load_sharded(s.url + "/", 0, 2, device="cpu", rules=RULES)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's own variable
        got = gpuload.load_sharded(s.url + "/", 1, 2, device="cpu", rules=RULES)
        assert not differing(got, expected_shards(matrix, 1, 2, {"big.row": 0}))
        _no_leaks(s)


def test_hf_redirect_to_a_cdn_drops_the_token(moe):
    """The Hub answers resolve URLs with a redirect to its CDN (another
    host): followed, and the token is never sent there."""
    repo = moe.parent / "cdn" / "org" / "r" / "resolve" / "main"
    repo.mkdir(parents=True)
    for p in moe.iterdir():
        shutil.copy(p, repo / p.name)
    with RangeServer(moe.parent / "cdn") as cdn:
        faults = Faults(token="hf_tok", redirect_to=cdn.url.replace("127.0.0.1", "localhost"))
        with RangeServer(moe.parent / "cdn", faults) as hub:
            got = gpuload.load_sharded(
                "hf://org/r",
                0,
                2,
                device="cpu",
                storage_options={"hf_endpoint": hub.url, "hf_token": "hf_tok"},
            )
            assert _same(got, gpuload.load_sharded(moe, 0, 2, device="cpu"))
            assert hub.auth_seen > 0 and cdn.auth_seen == 0
            _no_leaks(hub)
        _no_leaks(cdn)


def test_torch_load_into_takes_a_url(moe):
    torch = pytest.importorskip("torch")
    import gpuload.torch  # a subpackage: not an attribute until imported

    ref = gpuload.load_sharded(moe, 0, 1, device="cpu")
    name = next(n for n in ref if n.endswith("q_proj.weight"))
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(ref[name].shape, dtype=torch.bfloat16))
    with RangeServer(moe) as s:
        report = gpuload.torch.load_into(m, s.url + "/", name_map={"w": name}, strict=False)
        assert report.backend == "remote"
        _no_leaks(s)
    assert m.w.detach().view(torch.int16).numpy().tobytes() == ref[name].tobytes()
