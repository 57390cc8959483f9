"""http:// against nginx (a real Range server, ETag and If-Match as
deployed) on 127.0.0.1: every rank of worlds 1, 2, 4, 8 byte-exact for a
multi-file model with an index and an MoE, and the bytes nginx logged as
sent equal to the planned reads plus the header probes.

``make test`` installs nginx (Debian's package) when it is missing and sets
``TEST_NGINX=1``, so a missing nginx fails there instead of skipping."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import RULES, differing, expected_shards, write_matrix

import gpuload
from gpuload import synth

pytestmark = pytest.mark.timeout(240)

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
)

CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
  log_format sent '$request_uri $status $body_bytes_sent';
  access_log {tmp}/access.log sent;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location / {{ }}
  }}
}}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_nginx() -> None:
    """Skip without nginx, but fail under TEST_NGINX=1 (make test installs it)."""
    if NGINX is None:
        if os.environ.get("TEST_NGINX") == "1":
            pytest.fail("nginx is not installed (make test installs Debian's nginx-light)")
        pytest.skip("nginx is not installed")


def start_nginx(tmp: Path, conf: str, port: int) -> tuple[subprocess.Popen, str]:
    """Start nginx with ``conf`` (CONF formatted for ``port``) in ``tmp`` and
    wait until it accepts connections; returns the process and its URL."""
    (tmp / "nginx.conf").write_text(conf)
    err = tmp / "stderr.log"
    with open(err, "wb") as f:
        proc = subprocess.Popen([NGINX, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], stderr=f)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"nginx exited: {err.read_text()}")
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    require_nginx()
    root = tmp_path_factory.mktemp("www")
    tmp = tmp_path_factory.mktemp("nginx")
    (root / "matrix").mkdir()
    write_matrix(
        root / "matrix",
        np.random.default_rng(9),
        index=True,
        extra={"big.row": ("F32", (24, 65536)), "big.col": ("F32", (65536, 24))},
    )
    synth.write_model(root / "moe", "tiny-qwen-moe", num_files=3)
    port = _port()
    proc, url = start_nginx(tmp, CONF.format(tmp=tmp, port=port, root=root), port)
    yield url, root, tmp / "access.log"
    proc.terminate()
    proc.wait(10)


def _sent(log: Path, since: int) -> tuple[int, int]:
    """(bytes nginx sent, lines) logged after byte ``since`` of the log."""
    time.sleep(0.05)
    lines = log.read_bytes()[since:].decode().splitlines()
    return sum(int(line.split()[-1]) for line in lines), len(lines)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_nginx_every_rank_matches_oracle_and_logged_bytes(nginx, world):
    url, root, log = nginx
    dims = {"big.row": 0, "big.col": 1}
    for rank in range(world):
        since = log.stat().st_size if log.exists() else 0
        got, rep = gpuload.load_sharded(
            f"{url}/matrix/", rank, world, device="cpu", rules=RULES, return_report=True
        )
        assert not differing(got, expected_shards(root / "matrix", rank, world, dims))
        deadline = time.monotonic() + 5  # nginx logs a request after sending it
        while (sent := _sent(log, since)[0]) < rep.bytes_read + rep.bytes_header:
            if time.monotonic() > deadline:
                break

        planned = gpuload.Loader(device="cpu").plan(f"{url}/matrix/", rank, world, rules=RULES)
        # less what the two files' 1 MiB header probes already fetched
        assert planned.plan.bytes_read - 2 * (1 << 20) <= rep.bytes_read
        assert rep.bytes_read <= planned.plan.bytes_read
        assert 0 <= sent - rep.bytes_read - rep.bytes_header < 1024  # config.json's 404 page


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_nginx_moe_matches_local(nginx, world):
    url, root, _ = nginx
    for rank in range(world):
        got = gpuload.load_sharded(f"{url}/moe/", rank, world, device="cpu")
        want = gpuload.load_sharded(root / "moe", rank, world, device="cpu")
        assert set(got) == set(want)
        assert all(got[n].tobytes() == want[n].tobytes() for n in want)
