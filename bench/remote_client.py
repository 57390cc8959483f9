"""Which HTTP client remote loads use: gpuload's stdlib client against
obstore (Rust object_store), over the same ranges of one file that nginx
serves on 127.0.0.1 (no shaped link: this measures the client's own cost).

Each client fetches the whole file as ``--range-mib`` ranges with
``--threads`` requests in flight, into one preallocated buffer (gpuload:
``readinto`` straight into it; obstore: ``get_ranges`` then a copy, the
only way its ``Bytes`` reach a caller's buffer). Runs alternate between the
clients; the median of ``--runs`` is reported.

    python bench/remote_client.py [--size-mib 1024] [--range-mib 16] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CONF = """daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn; events {{ worker_connections 8192; }}
http {{ access_log off; sendfile on; client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p;
fastcgi_temp_path {tmp}/f; uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;
server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }} }}
"""


def nginx(root: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "nginx.conf").write_text(CONF.format(tmp=tmp, port=port, root=root))
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([exe, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def run_gpuload(url: str, size: int, rng: int, threads: int, out: np.ndarray) -> float:
    from gpuload.read.remote.client import Client, Target

    client = Client()
    t = Target(url)
    starts = list(range(0, size, rng))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(
            ex.map(
                lambda s: client.read_range(t, s, [memoryview(out)[s : min(size, s + rng)]]),
                starts,
            )
        )
    dt = time.perf_counter() - t0
    client.close()
    return dt


def run_obstore(url: str, size: int, rng: int, threads: int, out: np.ndarray) -> float:
    import obstore
    from obstore.store import HTTPStore

    store = HTTPStore.from_url(url.rsplit("/", 1)[0], client_options={"allow_http": True})
    name = url.rsplit("/", 1)[1]
    starts = list(range(0, size, rng))
    t0 = time.perf_counter()

    def one(s: int) -> None:
        e = min(size, s + rng)
        b = obstore.get_range(store, name, start=s, end=e)
        out[s:e] = np.frombuffer(memoryview(b), np.uint8)

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, starts))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--range-mib", type=int, default=16)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    size, rng = args.size_mib << 20, args.range_mib << 20
    with tempfile.TemporaryDirectory() as d:
        root, tmp = Path(d) / "www", Path(d) / "nginx"
        root.mkdir()
        tmp.mkdir()
        data = np.random.default_rng(0).integers(0, 256, size, np.uint8)
        (root / "blob.bin").write_bytes(data.tobytes())
        proc, base = nginx(root, tmp)
        url = f"{base}/blob.bin"
        out = np.empty(size, np.uint8)
        times: dict[str, list[float]] = {"gpuload": [], "obstore": []}
        try:
            for i in range(args.runs):
                order = ("gpuload", "obstore") if i % 2 == 0 else ("obstore", "gpuload")
                for name in order:
                    out[:] = 0
                    fn = run_gpuload if name == "gpuload" else run_obstore
                    times[name].append(fn(url, size, rng, args.threads, out))
                    assert np.array_equal(out, data), name
        finally:
            proc.terminate()
            proc.wait(10)
    res = {
        "size_mib": args.size_mib,
        "range_mib": args.range_mib,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        **{f"{k}_gib_s": round(size / statistics.median(v) / 2**30, 3) for k, v in times.items()},
        "runs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
