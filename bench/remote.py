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

gpuload over ``s3://`` too (world 8, rank alone and all ranks): nginx
answers the one ListObjectsV2 a load sends with a listing written here, and
serves ``/s3b/model/FILE`` from the same files (it ignores the signature).
S3 has no multi-range GET, so these loads read column shards as covering
ranges: the S3 lines show what that costs beside the http:// ones.

``--repeats N`` runs the whole measurement N times per rate (Run:ai
interleaved with gpuload's world 1 in each), records the load average
before and after each, and a ``summary`` of medians and spreads.

Then a sweep of world 1 over reader threads (one GET in flight each) and
read sizes (``GPULOAD_THREADS``, ``GPULOAD_CHUNK_BYTES``): how many requests
of what size fill the link.

    python bench/remote.py [--size-gib 2] [--rates 1gbit,10gbit] [--delay-ms 0.5]
        [--repeats 3] [--runai-python PY] [--out DIR]
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
BUCKET = "s3b"  # /s3b/model/FILE is the checkpoint's FILE (a link to the scratch folder)

LISTING = """<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
<Name>{bucket}</Name><Prefix>model/</Prefix><IsTruncated>false</IsTruncated>
{contents}</ListBucketResult>
"""


def s3_env(endpoint: str) -> dict:
    """gpuload's S3 settings for nginx as a path-style endpoint (dummy keys)."""
    return {
        **ENV,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def listing(model: Path, names: list[str]) -> str:
    contents = "".join(
        f"<Contents><Key>model/{n}</Key><Size>{(model / n).stat().st_size}</Size></Contents>\n"
        for n in names
    )
    return LISTING.format(bucket=BUCKET, contents=contents)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


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


def world8(url: str, env: dict | None = None) -> dict:
    """8 processes at once, one rank each, sharing the link."""
    b0 = tx_bytes()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD, url, str(r), "8"], stdout=subprocess.PIPE, env=env or ENV
        )
        for r in range(8)
    ]
    ranks = [json.loads(p.communicate()[0].decode().strip().splitlines()[-1]) for p in procs]
    return {
        "link_bytes": tx_bytes() - b0,
        "rank_s": [round(r["s"], 3) for r in ranks],
        "max_s": max(r["s"] for r in ranks),
        "bytes_read": sum(r["bytes_read"] for r in ranks),
        "bytes_header": sum(r["bytes_header"] for r in ranks),
    }


def measured(code: str, *args: str, env: dict | None = None, python: str | None = None) -> dict:
    b0 = tx_bytes()
    r = run(code, *args, env=env, python=python)
    r["link_bytes"] = tx_bytes() - b0
    return r


def measure(url: str, s3: str, names: list[str], scratch: Path) -> dict:
    res: dict = {"loadavg_before": loadavg()}
    res["world1"] = measured(LOAD, url, "0", "1")
    res["world8_rank0_alone"] = measured(LOAD, url, "0", "8")
    res["world8_all"] = world8(url)
    env = s3_env(s3)
    res["s3_world8_rank0_alone"] = measured(LOAD, f"s3://{BUCKET}/model/", "0", "8", env=env)
    res["s3_world8_all"] = world8(f"s3://{BUCKET}/model/", env)
    dl = scratch / "dl"
    dl.mkdir(exist_ok=True)
    res["download_then_load"] = measured(DOWNLOAD, url, ",".join(names), str(dl))
    shutil.rmtree(dl)
    res["loadavg_after"] = loadavg()
    return res


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summary(reps: list[dict], size: int) -> dict:
    """Medians and (min, max) over the repeats of the issue's ratios."""
    ratios: dict[str, list[float]] = {}

    def add(k: str, v: float) -> None:
        ratios.setdefault(k, []).append(round(v, 4))

    for r in reps:
        w1 = r["world1"]["s"]
        add("world1_s", w1)
        add("world8_alone_over_world1", r["world8_rank0_alone"]["s"] / w1)
        add("world8_all_slowest_over_world1", r["world8_all"]["max_s"] / w1)
        add("http_world8_link_bytes_over_checkpoint", r["world8_all"]["link_bytes"] / size)
        add("s3_world8_link_bytes_over_checkpoint", r["s3_world8_all"]["link_bytes"] / size)
        add("s3_world8_alone_over_world1", r["s3_world8_rank0_alone"]["s"] / w1)
        add("download_then_load_over_world1", r["download_then_load"]["s"] / w1)
        if "runai_world1" in r:
            add("runai_world1_over_world1", r["runai_world1"]["s"] / w1)
    return {
        k: {"median": _median(v), "min": min(v), "max": max(v), "all": v} for k, v in ratios.items()
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(results["runs"])
    labels = ["world 1", "world 8 rank alone", "world 8 (slowest of 8)", "download+load"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rates)
    for i, rate in enumerate(rates):
        reps = results["runs"][rate]
        vals = [
            _median([r["world1"]["s"] for r in reps]),
            _median([r["world8_rank0_alone"]["s"] for r in reps]),
            _median([r["world8_all"]["max_s"] for r in reps]),
            _median([r["download_then_load"]["s"] for r in reps]),
        ]
        ax.bar([x + i * width for x in range(4)], vals, width, label=rate)
    ax.set_xticks([x + width * (len(rates) - 1) / 2 for x in range(4)], labels)
    ax.set_ylabel("seconds to tensors (host memory), median of repeats")
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
    ap.add_argument("--repeats", type=int, default=1, help="measurements per rate")
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
        # ListObjectsV2 of s3://s3b/model/ (GET /s3b/?list-type=2...): the listing
        s3loc = (
            "location = /%s/ { default_type application/xml; root %s; try_files /list.xml =404; }"
        )
        conf = conf.replace("location / { }", "location / { } " + s3loc % (BUCKET, tmp))
        (tmp / "list.xml").write_text(listing(model, names))
        (scratch / BUCKET).symlink_to(scratch)
        (tmp / "nginx.conf").write_text(conf.replace("127.0.0.1:8080", f"{NET}.2:8080"))
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        nginx = subprocess.Popen(
            ["ip", "netns", "exec", NS, exe, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)]
        )
        time.sleep(0.5)
        url = f"http://{NET}.2:8080/model/"
        s3 = f"http://{NET}.2:8080"
        results["summary"], results["sweep"] = {}, {}
        for rate in args.rates.split(","):
            results.setdefault("shaping", {})[rate] = shape(rate, args.delay_ms)
            reps = []
            for k in range(args.repeats):
                if args.only_runai:
                    r = {"loadavg_before": loadavg(), "world1": measured(LOAD, url, "0", "1")}
                else:
                    r = measure(url, s3, names, scratch)
                if args.runai_python:
                    r.update(measure_runai(args.runai_python, s3, names, args.runai_ranks))
                reps.append(r)
                print(json.dumps({rate: {"repeat": k, **r}}), flush=True)
            results["runs"][rate] = reps
            if not args.only_runai:
                results["summary"][rate] = summary(reps, size)
                print(json.dumps({rate: results["summary"][rate]}, indent=1), flush=True)
            if args.sweep_threads and not args.only_runai:
                results["sweep"][rate] = sweep(
                    url,
                    [int(x) for x in args.sweep_threads.split(",")],
                    args.sweep_chunks.split(","),
                )
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
