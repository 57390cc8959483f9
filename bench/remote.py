"""Remote loads over a shaped link: gpuload world 1 and world 8 against
download-then-load, from nginx in a network namespace this script makes.

The link: a veth pair between this namespace and a new one (``gpl-<pid>``,
addresses 10.213.X.1/2 made here), with ``tc netem`` rate and delay on both
ends (``--delay-ms`` each way, so the RTT is twice that; where the kernel has no
netem, ``tbf`` shapes the rate and no delay is added, and the results say
so). nginx (Debian's)
runs inside the namespace and serves a synthetic multi-file checkpoint
(``gpuload.synth``, ``--size-gib``). For each rate:

* gpuload world 1: one process, ``load_sharded(url, 0, 1, device="cpu")``;
* gpuload world 8, one rank alone: rank 0 of 8 with the link to itself;
* gpuload world 8, all ranks: 8 processes at once, one rank each, sharing
  the link (what a tensor-parallel job on one node does);
* download then load: every file fetched whole (one stream per file, all at
  once, as ``huggingface-cli download`` does), then ``safetensors`` loads
  them.

Times are each process's own, from its start of the load to its tensors in
memory (import excluded); link bytes are the namespace's veth ``tx_bytes``
(headers included). Needs root (netns, tc) and nginx.

With ``--runai-python PY`` (a Python with ``runai-model-streamer`` and
``runai-model-streamer-s3``), the Run:ai streamer's S3 reader too, against
the same nginx as a path-style S3 endpoint: one process, and
``--runai-ranks`` processes at once, each streaming every file (what vLLM's
runai loader streams on every rank); ``--only-runai`` runs just gpuload
world 1 and those.

Then a sweep of world 1 over reader threads (one GET in flight each) and
read sizes (``GPULOAD_THREADS``, ``GPULOAD_CHUNK_BYTES``): how many requests
of what size fill the link.

    python bench/remote.py [--size-gib 2] [--rates 1gbit,10gbit] [--delay-ms 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from remote_client import CONF

NS = f"gpl-{os.getpid()}"
HOST_IF, NS_IF = f"gh{os.getpid() % 100000}", f"gn{os.getpid() % 100000}"
NET = f"10.213.{os.getpid() % 250}"


def sh(*cmd: str, ns: bool = False) -> str:
    full = ["ip", "netns", "exec", NS, *cmd] if ns else list(cmd)
    return subprocess.run(full, check=True, capture_output=True, text=True).stdout


def link_up(rate: str, delay_ms: float) -> None:
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF)
    sh("ip", "link", "set", NS_IF, "netns", NS)
    sh("ip", "addr", "add", f"{NET}.1/30", "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    sh("ip", "addr", "add", f"{NET}.2/30", "dev", NS_IF, ns=True)
    sh("ip", "link", "set", NS_IF, "up", ns=True)
    sh("ip", "link", "set", "lo", "up", ns=True)
    shape(rate, delay_ms)


def shape(rate: str, delay_ms: float) -> str:
    """netem rate and delay on both ends; where the kernel has no netem
    (this VM's kernel has no sch_netem), tbf: the rate, without the delay.
    Returns what was applied."""
    tries = [
        ("netem", ["netem", "rate", rate, "delay", f"{delay_ms}ms", "limit", "100000"]),
        (
            "tbf (no netem: no added delay)",
            ["tbf", "rate", rate, "burst", "4mb", "latency", "50ms"],
        ),
    ]
    for what, args in tries:
        try:
            sh("tc", "qdisc", "replace", "dev", HOST_IF, "root", *args)
            sh("tc", "qdisc", "replace", "dev", NS_IF, "root", *args, ns=True)
            return f"{what}: {' '.join(args)}"
        except subprocess.CalledProcessError:
            continue
    raise RuntimeError("neither netem nor tbf is available")


def link_down() -> None:
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "link", "del", HOST_IF], capture_output=True)


def tx_bytes() -> int:
    return int(sh("cat", f"/sys/class/net/{NS_IF}/statistics/tx_bytes", ns=True))


LOAD = """
import json, sys, time
import gpuload
url, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
out, rep = gpuload.load_sharded(url, rank, world, device="cpu", return_report=True)
dt = time.perf_counter() - t0
print(json.dumps({"s": dt, "bytes_read": rep.bytes_read, "bytes_header": rep.bytes_header,
                  "tensors": len(out)}))
"""

DOWNLOAD = """
import json, sys, time, urllib.request, concurrent.futures, pathlib, tempfile, shutil
from safetensors.torch import load_file
base, names, where = sys.argv[1], sys.argv[2].split(","), pathlib.Path(sys.argv[3])
t0 = time.perf_counter()
def get(n):
    with urllib.request.urlopen(base + n) as r, open(where / n, "wb") as f:
        shutil.copyfileobj(r, f, 16 << 20)
with concurrent.futures.ThreadPoolExecutor(len(names)) as ex:
    list(ex.map(get, names))
t1 = time.perf_counter()
out = {}
for n in names:
    if n.endswith(".safetensors"):
        out.update(load_file(str(where / n)))
t2 = time.perf_counter()
print(json.dumps({"s": t2 - t0, "download_s": t1 - t0, "load_s": t2 - t1, "tensors": len(out)}))
"""


ENV = {**os.environ, "GPULOAD_PROGRESS": "0"}


RUNAI = """
import json, sys, time
from runai_model_streamer import SafetensorsStreamer
base, names = sys.argv[1], sys.argv[2].split(",")
t0 = time.perf_counter()
n = 0
with SafetensorsStreamer() as s:
    s.stream_files([base + f for f in names if f.endswith(".safetensors")])
    for name, t in s.get_tensors():
        n += t.numel() * t.element_size()
print(json.dumps({"s": time.perf_counter() - t0, "tensor_bytes": n}))
"""


def runai_env(endpoint: str) -> dict:
    """The Run:ai streamer's S3 client (AWS SDK) at nginx, path style; nginx
    ignores the (dummy) signature."""
    return {
        **ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
    }


def measure_runai(py: str, endpoint: str, names: list[str], ranks: int) -> dict:
    """Run:ai's streamer as vLLM's runai loader uses it: every rank streams
    every file (s3://model/FILE is nginx's /model/FILE)."""
    env = runai_env(endpoint)
    res: dict = {}
    b0 = tx_bytes()
    res["runai_world1"] = run(RUNAI, "s3://model/", ",".join(names), env=env, python=py)
    res["runai_world1"]["link_bytes"] = tx_bytes() - b0
    if ranks > 1:
        b0 = tx_bytes()
        procs = [
            subprocess.Popen(
                [py, "-c", RUNAI, "s3://model/", ",".join(names)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for _ in range(ranks)
        ]
        outs, errors = [], []
        for p in procs:
            out, err = p.communicate()
            if p.returncode:
                errors.append(err.decode()[-300:])
            else:
                outs.append(json.loads(out.decode().strip().splitlines()[-1]))
        res[f"runai_{ranks}_procs"] = {
            "link_bytes": tx_bytes() - b0,
            "rank_s": [round(o["s"], 3) for o in outs],
            "max_s": max((o["s"] for o in outs), default=None),
            "failed": errors,  # processes that failed, with the end of their stderr
        }
    return res


def run(code: str, *args: str, env: dict | None = None, python: str | None = None) -> dict:
    out = subprocess.run(
        [python or sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env or ENV,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def sweep(url: str, threads: list[int], chunks: list[str]) -> list[dict]:
    """World 1 with each reader-thread count (requests in flight) and read size."""
    out = []
    for chunk in chunks:
        for n in threads:
            env = {**ENV, "GPULOAD_THREADS": str(n), "GPULOAD_CHUNK_BYTES": chunk}
            env["GPULOAD_MIN_CHUNK_BYTES"] = chunk
            r = run(LOAD, url, "0", "1", env=env)
            out.append({"threads": n, "chunk": chunk, "s": round(r["s"], 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def measure(url: str, names: list[str], scratch: Path) -> dict:
    res: dict = {}
    b0 = tx_bytes()
    res["world1"] = run(LOAD, url, "0", "1")
    res["world1"]["link_bytes"] = tx_bytes() - b0
    b0 = tx_bytes()
    res["world8_rank0_alone"] = run(LOAD, url, "0", "8")
    res["world8_rank0_alone"]["link_bytes"] = tx_bytes() - b0
    b0 = tx_bytes()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, url, str(r), "8"], stdout=subprocess.PIPE, env=ENV
        )
        for r in range(8)
    ]
    ranks = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    res["world8_all"] = {
        "link_bytes": tx_bytes() - b0,
        "rank_s": [round(r["s"], 3) for r in ranks],
        "max_s": max(r["s"] for r in ranks),
        "bytes_read": sum(r["bytes_read"] for r in ranks),
        "bytes_header": sum(r["bytes_header"] for r in ranks),
    }
    dl = scratch / "dl"
    dl.mkdir(exist_ok=True)
    b0 = tx_bytes()
    res["download_then_load"] = run(DOWNLOAD, url, ",".join(names), str(dl))
    res["download_then_load"]["link_bytes"] = tx_bytes() - b0
    shutil.rmtree(dl)
    return res


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(results["runs"])
    labels = ["world 1", "world 8 rank alone", "world 8 (slowest of 8)", "download+load"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        r = results["runs"][rate]
        vals = [
            r["world1"]["s"],
            r["world8_rank0_alone"]["s"],
            r["world8_all"]["max_s"],
            r["download_then_load"]["s"],
        ]
        ax.bar([x + i * width for x in range(4)], vals, width, label=rate)
    ax.set_xticks([x + width * (len(rates) - 1) / 2 for x in range(4)], labels)
    ax.set_ylabel("seconds to tensors (host memory)")
    shaping = next(iter(results["shaping"].values())).rsplit(": ", 1)[0]
    ax.set_title(f"{results['size_gib']} GiB checkpoint, link shaped by {shaping}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--rates", default="1gbit,10gbit")
    ap.add_argument("--delay-ms", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sweep-threads", default="1,4,8,16", help="world-1 sweep ('' skips it)")
    ap.add_argument("--sweep-chunks", default="4MiB,16MiB")
    ap.add_argument("--runai-python", help="a python with runai-model-streamer[-s3]: compare")
    ap.add_argument("--runai-ranks", type=int, default=8, help="Run:ai processes at once")
    ap.add_argument("--only-runai", action="store_true", help="gpuload world 1 and Run:ai only")
    args = ap.parse_args()
    from gpuload import synth

    scratch = Path(tempfile.mkdtemp(prefix="gpl-remote-"))
    os.chmod(scratch, 0o755)
    model = synth.write_model(
        scratch / "model", "llama", target_bytes=int(args.size_gib * 2**30), num_files=4
    )
    names = sorted(p.name for p in model.iterdir() if p.is_file())
    size = sum((model / n).stat().st_size for n in names if n.endswith(".safetensors"))
    tmp = scratch / "nginx"
    tmp.mkdir()
    results: dict = {
        "size_gib": round(size / 2**30, 3),
        "files": names,
        "rtt_ms": 2 * args.delay_ms,
        "cpus": os.cpu_count(),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "runs": {},
    }
    nginx = None
    try:
        link_up(args.rates.split(",")[0], args.delay_ms)
        conf = CONF.format(tmp=tmp, port=8080, root=scratch)
        (tmp / "nginx.conf").write_text(conf.replace("127.0.0.1:8080", f"{NET}.2:8080"))
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        nginx = subprocess.Popen(
            ["ip", "netns", "exec", NS, exe, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
        )
        time.sleep(0.5)
        url = f"http://{NET}.2:8080/model/"
        for rate in args.rates.split(","):
            results.setdefault("shaping", {})[rate] = shape(rate, args.delay_ms)
            if args.only_runai:
                b0 = tx_bytes()
                w1 = run(LOAD, url, "0", "1")
                w1["link_bytes"] = tx_bytes() - b0
                results["runs"][rate] = {"world1": w1}
            else:
                results["runs"][rate] = measure(url, names, scratch)
            if args.runai_python:
                results["runs"][rate].update(
                    measure_runai(
                        args.runai_python, f"http://{NET}.2:8080", names, args.runai_ranks
                    )
                )
            if args.sweep_threads and not args.only_runai:
                results["runs"][rate]["sweep"] = sweep(
                    url,
                    [int(x) for x in args.sweep_threads.split(",")],
                    args.sweep_chunks.split(","),
                )
            print(json.dumps({rate: results["runs"][rate]}, indent=1), flush=True)
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        link_down()
        shutil.rmtree(scratch, ignore_errors=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "runai" if args.only_runai else "remote"
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        if not args.only_runai:
            plot(results, args.out / "remote.png")


if __name__ == "__main__":
    main()
