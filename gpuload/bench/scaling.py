"""Does a rank's load scale with its shard? The scaling table and its plot.

For each mode, gpuload's rank-0 time at world 1, 2, 4, 8 beside the ideal,
world-1 time / world, and the bytes the rank read beside the bytes it owns
(from the plan: covering reads read whole rows of column shards, so a rank
reads more than it owns). A ratio near 1 in both columns is the promise kept:
load time scales with the shard's bytes, not the file's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpuload.bench.report import Group

MiB = float(1 << 20)


def rows(
    groups: list[Group], full_title: str, plans: dict[int, tuple[int, int]]
) -> list[dict[str, Any]]:
    """One dict per (mode, world) that has a gpuload row at world 1 and at that world.

    ``plans``: world -> (bytes read, bytes owned) by rank 0."""
    out = []
    for mode in ("warm", "cold"):
        base = _gpuload(groups, full_title, mode)
        if base is None:
            continue
        for world in sorted(plans):
            title = full_title if world == 1 else f"world={world}, rank 0"
            r = _gpuload(groups, title, mode)
            if r is None:
                continue
            read, owned = plans[world]
            ideal = base.seconds / world
            out.append(
                {
                    "mode": mode,
                    "world": world,
                    "contender": r.name,
                    "seconds": r.seconds,
                    "min_s": r.lo_hi[0],
                    "max_s": r.lo_hi[1],
                    "ideal_s": ideal,
                    "over_ideal": r.seconds / ideal if ideal > 0 else None,
                    "bytes_read": read,
                    "bytes_owned": owned,
                    "read_over_owned": read / owned if owned else None,
                }
            )
    return out


def _gpuload(groups: list[Group], title: str, mode: str):
    g = next((g for g in groups if g.title == title and g.mode == mode), None)
    return None if g is None else next((r for r in g.rows if r.kind == "gpuload"), None)


def markdown(table: list[dict[str, Any]]) -> str:
    if not table:
        return ""
    out = [
        "### Scaling: rank 0 against world-1 time / world",
        "",
        "gpuload's rank-0 median (min–max) at each world; ideal = the world-1 median / world; "
        "bytes read and owned by rank 0, from the plan.",
        "",
        "| mode | world | rank 0 s (min–max) | ideal s | × ideal "
        "| MiB read | MiB owned | read / owned |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for t in table:
        out.append(
            f"| {t['mode']} | {t['world']} | {t['seconds']:.3g} ({t['min_s']:.3g}–{t['max_s']:.3g})"
            f" | {t['ideal_s']:.3g} | {t['over_ideal']:.2f} | {t['bytes_read'] / MiB:.4g}"
            f" | {t['bytes_owned'] / MiB:.4g} | {t['read_over_owned']:.2f} |"
        )
    return "\n".join(out + [""])


def plot(path: Path, table: list[dict[str, Any]], title: str) -> str | None:
    """Rank-0 seconds against world (log-log) with the ideal, per mode; and
    read / owned bytes. None when written, else why not."""
    if not table:
        return "no world-1 and shard figures for gpuload"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed (pip install 'gpuload[bench]'): {e}"
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, mode in enumerate(dict.fromkeys(t["mode"] for t in table)):
        ts = [t for t in table if t["mode"] == mode]
        ws = [t["world"] for t in ts]
        color = plt.get_cmap("tab10")(i)
        err = [
            [t["seconds"] - t["min_s"] for t in ts],
            [t["max_s"] - t["seconds"] for t in ts],
        ]
        ax.errorbar(ws, [t["seconds"] for t in ts], yerr=err, marker="o", color=color,
                    capsize=3, label=f"{mode}: rank 0")  # fmt: skip
        ax.plot(ws, [t["ideal_s"] for t in ts], "--", color=color, label=f"{mode}: world-1 / world")
        if i == 0:
            bx.plot(ws, [t["read_over_owned"] for t in ts], marker="o", color="black")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("world")
    ax.set_ylabel("seconds")
    ax.set_title(f"{title}: rank-0 load time")
    ax.legend(fontsize="small")
    bx.set_xscale("log", base=2)
    bx.axhline(1.0, color="grey", linewidth=1)
    bx.set_xlabel("world")
    bx.set_ylabel("bytes read / bytes owned (rank 0)")
    bx.set_title("read amplification")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
