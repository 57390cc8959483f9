"""Mutate-during-load soak: a checkpoint truncated, extended, rewritten in
place or renamed over at a random moment of a load_sharded, worlds 1 and 8,
with cpu_resident off, mapped (True) and copied ("copy").

    python bench/mutate_soak.py --trials 2000 --json out.json
    python bench/mutate_soak.py --trials 100 --seed 3          # a quick one

Trials run in worker processes (one at a time): a worker that dies of a
signal (SIGBUS) is a *crash*, recorded with its trial, and a fresh worker
goes on. In a trial a mutator thread sleeps a random time (up to 1.5 x the
mode's measured load time), then changes the file; the main thread loads.
A lock orders the mutation against a snapshot of the results taken right
after the load returns, so either the mutation finished before the load
returned, or the snapshot was taken before it began. Outcomes:

- ``error``: the load raised a GpuloadError (ReadError expected);
- ``unchanged``: it returned and the mutation began after the snapshot;
  every byte must equal the oracle's (safetensors + numpy slicing of the
  pristine file);
- ``over_changed``: it returned although the mutation had finished before
  it returned (the target is 0). ``over_changed_missed`` counts those whose
  mutation finished before gpuload's last identity check began (a miss);
  the rest finished between that check and the return (microseconds: the
  check is the load's last step, and load_sharded then closes its Loader);
- ``wrong_bytes``: a returned result differs from the oracle where it must
  not (read and copied results always; views when the mutation began after
  the load returned, so the snapshot preceded it);
- ``crash``: the worker died inside the load (``exitcode`` -7: SIGBUS);
- ``hang``: no answer for 120 s (the worker is killed).

A view snapshot is copied with process_vm_readv, so a view over a page
truncated around the return is counted (``views_poisoned_after``), not a
crash of the soak: that is the documented after-return risk of mapped views.
``over_changed_missed`` is measured against the soaked code's own last
identity check (on code before issue 23, the reader's close, which ran
before the resident tensors were mapped).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

MODES = ("off", "mapped", "copy")
MUTATIONS = ("truncate", "extend", "rewrite", "rename")
WORLDS = (1, 8)
HANG_S = 120  # a trial that answers nothing for this long is a hang
SPEC = dict(  # a small Mixtral: 12 MiB of experts over 2 layers, heads and kv 8
    family="mixtral", dims="256 8 8 32 512 2048 2", experts=8, experts_per_tok=2
)


def _write_pristine(where: Path) -> Path:
    from gpuload.synth.layout import write_model
    from gpuload.synth.models import ModelSpec

    dims = list(map(int, SPEC["dims"].split()))
    spec = ModelSpec(
        SPEC["family"], *dims, experts=SPEC["experts"], experts_per_tok=SPEC["experts_per_tok"]
    )
    return write_model(where, spec, num_files=1)


def _resident(mode: str):
    return {"off": None, "mapped": True, "copy": "copy"}[mode]


def _safe_bytes(a: np.ndarray) -> bytes | None:
    """``a``'s bytes, copied with process_vm_readv: None where a page of it
    cannot be read (a view over a truncated file), instead of SIGBUS."""
    from gpuload.read.vectored import _vm_readv_raw

    a = a.view(np.uint8) if a.dtype.kind not in "V" else a
    if a.size == 0:
        return b""
    if not a.flags.c_contiguous:  # a column cut: row by row
        return b"".join(_safe_bytes(r) or b"\0POISON" for r in a)  # type: ignore[misc]
    out = np.empty(a.nbytes, np.uint8)
    local = np.array([[out.ctypes.data, a.nbytes]], np.uint64)
    remote = np.array([[a.ctypes.data, a.nbytes]], np.uint64)
    try:
        got = _vm_readv_raw(local, remote)
    except OSError:
        return None
    return out.tobytes() if got == a.nbytes else None


def _mutate(path: str, kind: str, r: random.Random) -> None:
    size = os.path.getsize(path)
    if kind == "truncate":
        os.truncate(path, r.randrange(size))
    elif kind == "extend":
        with open(path, "ab") as f:
            f.write(b"\x55" * r.randint(1, 1 << 16))
    elif kind == "rewrite":  # in place, same size, other bytes
        at = r.randrange(size)
        n = min(size - at, r.randint(1, 1 << 16))
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, np.random.default_rng(r.getrandbits(32)).bytes(n), at)
        finally:
            os.close(fd)
    elif kind == "rename":  # a new file, one byte changed, moved over the old
        tmp = path + ".new"
        shutil.copyfile(path, tmp)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            at = r.randrange(size)
            os.pwrite(fd, bytes([r.getrandbits(8)]), at)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def _mutator(go, gate, times, delay, path, kind, r) -> None:
    go.wait()
    time.sleep(delay)
    with gate:
        times["start"] = time.perf_counter()
        _mutate(path, kind, r)
        times["done"] = time.perf_counter()


def _record_checks(checks: list[float]) -> None:
    """Note when each of gpuload's file identity checks begins (the reader's
    close, and the check after mapped pages are populated and at the end of
    a load), so an ``over_changed`` result can be told apart: a mutation
    that finished before the last check began was missed; one that
    finished after it landed in the microseconds before the return."""
    import gpuload.host.resident
    import gpuload.read.posix

    def timed(f):
        def wrapper(*a, **k):
            checks.append(time.perf_counter())
            return f(*a, **k)

        return wrapper

    if hasattr(gpuload.host.resident, "check_unchanged"):  # not before issue 23
        gpuload.host.resident.check_unchanged = timed(gpuload.host.resident.check_unchanged)
    gpuload.read.posix.PosixReader.close = timed(gpuload.read.posix.PosixReader.close)


def _worker(conn, pristine: str, workdir: str, oracle_file: str) -> None:
    """Runs trials sent over ``conn``; answers each with its outcome."""
    import gpuload
    from gpuload.sharding.verify import cut, reference_tensors

    ref = reference_tensors([oracle_file])
    plans: dict = {}
    checks: list[float] = []  # when gpuload's identity checks began, this trial
    _record_checks(checks)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        trial, mode, world, rank, kind, delay, seed = msg
        r = random.Random(seed)
        src = os.path.join(workdir, f"t{trial % 2}")
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(pristine, src)
        (path,) = [str(p) for p in Path(src).glob("*.safetensors")]
        key = (mode, world, rank)
        if key not in plans:
            lp = gpuload.Loader(device="cpu").plan(src, rank, world, cpu_resident=_resident(mode))
            sels = {**lp.resident, **{t.name: t.selection for t in lp.plan.tensors}}
            plans[key] = ({n: cut(ref[n], s).tobytes() for n, s in sels.items()}, set(lp.resident))
        want, resident = plans[key]
        # The header is parsed before the mutator starts (a load of a
        # Checkpoint, as after Loader.plan): the load knows the pristine
        # file, so any mutation that finishes before it returns must raise.
        ckpt = gpuload.open_checkpoint(src)
        gate, go = threading.Lock(), threading.Event()
        times = {}

        m = threading.Thread(target=_mutator, args=(go, gate, times, delay, path, kind, r))
        out = {"trial": trial}
        conn.send(("start", trial))  # the parent knows what ran if we die
        checks.clear()
        m.start()
        go.set()
        try:
            got = gpuload.load_sharded(
                ckpt,
                rank,
                world,
                device="cpu",
                cpu_resident=_resident(mode),
                prefault=True,
                pin=r.random() < 0.5,
                progress=False,
            )
        except gpuload.GpuloadError as e:
            out.update(outcome="error", error=type(e).__name__)
            m.join()
            conn.send(("done", out))
            continue
        t_ret = time.perf_counter()
        with gate:
            snap = {n: _safe_bytes(a) for n, a in got.items()}
            mutated_before = "done" in times and times["done"] < t_ret
            # a miss: the mutation finished before gpuload's last check began
            missed = mutated_before and bool(checks) and times["done"] < checks[-1]
        m.join()
        # A view shows the file as it is: one mutated before the snapshot
        # (the mutation began before the return) may differ or be poisoned.
        began_before = "start" in times and times["start"] < t_ret
        wrong, poisoned = [], 0
        for n, b in snap.items():
            view = mode == "mapped" and n in resident
            if b is None:
                poisoned += 1
                if not (view and began_before):
                    wrong.append(n)
            elif b != want[n] and not (view and began_before):
                wrong.append(n)
        out.update(
            outcome="over_changed" if mutated_before else "unchanged",
            missed=missed,
            wrong=wrong,
            poisoned=poisoned,
        )
        del got
        conn.send(("done", out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="gpuload-mutate-"))
    try:
        pristine = _write_pristine(root / "pristine")
        (oracle,) = list(pristine.glob("*.safetensors"))
        oracle_copy = root / "oracle.safetensors"
        shutil.copyfile(oracle, oracle_copy)
        work = root / "work"
        work.mkdir()
        load_s = _time_loads(pristine)
        counts = _run(args, pristine, work, oracle_copy, load_s)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    import gpuload

    counts["load_s"] = load_s
    counts["gpuload"] = os.path.dirname(gpuload.__file__)  # which code was soaked
    counts["command"] = "python bench/mutate_soak.py " + " ".join(argv or sys.argv[1:])
    print(json.dumps(counts, indent=1, sort_keys=True))
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1, sort_keys=True) + "\n")
    bad = counts["crash"] + counts["hang"] + counts["wrong_bytes_trials"] + counts["over_changed"]
    return 1 if bad else 0


def _time_loads(pristine: Path) -> dict:
    import gpuload

    out = {}
    for mode in MODES:
        for world in WORLDS:
            t0 = time.perf_counter()
            for _ in range(3):
                gpuload.load_sharded(
                    pristine, 0, world, device="cpu", cpu_resident=_resident(mode), prefault=True
                )
            out[f"{mode}/{world}"] = (time.perf_counter() - t0) / 3
    return out


def _run(args, pristine: Path, work: Path, oracle: Path, load_s: dict) -> dict:
    r = random.Random(args.seed)
    ctx = mp.get_context("spawn")
    counts: dict = {
        "trials": 0,
        "error": 0,
        "errors": {},
        "unchanged": 0,
        "over_changed": 0,
        "over_changed_missed": 0,
        "crash": 0,
        "hang": 0,
        "crashes": [],
        "wrong_bytes_trials": 0,
        "wrong": [],
        "views_poisoned_after": 0,
        "by": {},
    }
    proc = conn = None
    for trial in range(args.trials):
        mode, world, kind = r.choice(MODES), r.choice(WORLDS), r.choice(MUTATIONS)
        rank = r.randrange(world)
        delay = r.uniform(0, 1.5 * load_s[f"{mode}/{world}"])
        if proc is None:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, str(pristine), str(work), str(oracle)))
            proc.start()
            child.close()  # the worker's end: its death must read as EOF here
        conn.send((trial, mode, world, rank, kind, delay, r.getrandbits(32)))
        result, hung = None, False
        try:
            while True:
                if not conn.poll(HANG_S):
                    hung = True
                    break
                tag, val = conn.recv()
                if tag == "done":
                    result = val
                    break
        except EOFError:
            pass
        counts["trials"] += 1
        by = counts["by"].setdefault(f"{mode}/w{world}/{kind}", {})
        if result is None:  # the worker died (or hangs): how?
            if hung:
                proc.kill()
            proc.join()
            what = "hang" if hung else "crash"
            counts[what] += 1
            counts["crashes"].append(
                dict(
                    trial=trial,
                    mode=mode,
                    world=world,
                    kind=kind,
                    exitcode=proc.exitcode,
                    what=what,
                )
            )
            by[what] = by.get(what, 0) + 1
            conn.close()
            proc = conn = None
            continue
        o = result["outcome"]
        by[o] = by.get(o, 0) + 1
        if o == "error":
            counts["error"] += 1
            counts["errors"][result["error"]] = counts["errors"].get(result["error"], 0) + 1
        else:
            counts[o] += 1
            counts["over_changed_missed"] += bool(result.get("missed"))
            counts["views_poisoned_after"] += result["poisoned"]
            if result["wrong"]:
                counts["wrong_bytes_trials"] += 1
                counts["wrong"].append(dict(trial=trial, mode=mode, world=world, kind=kind))
    if proc is not None:
        conn.send(None)
        proc.join()
    return counts


if __name__ == "__main__":
    sys.exit(main())
