"""Results: rows grouped by scenario and mode, ratios, goals, and the three
outputs (a Markdown table, a JSON record of every raw run, a PNG plot)."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from gpuload.bench.residency import summary as _residency
from gpuload.bench.timing import GiB, Timing


@dataclasses.dataclass
class Row:
    """One contender (or limit) in one group: a scenario at one mode.

    ``timings`` holds one :class:`Timing` (one rank), or one per rank for a
    "mean over ranks" row: then ``seconds`` is the mean of the ranks'
    medians and the spread runs from the fastest to the slowest rank.
    """

    group: str  # e.g. "full load, world=1"
    mode: str  # "warm" | "cold"
    name: str
    kind: str  # "limit" | "gpuload" | "peer"
    timings: list[Timing]
    note: str = ""
    peak_device_bytes: int | None = None
    ratio_limit: float | None = None
    ratio_peer: float | None = None

    @property
    def nbytes(self) -> float:
        return statistics.mean(t.nbytes for t in self.timings)

    @property
    def seconds(self) -> float:
        return statistics.mean(t.median for t in self.timings)

    @property
    def lo_hi(self) -> tuple[float, float]:
        if len(self.timings) == 1:
            return min(self.timings[0].runs), max(self.timings[0].runs)
        meds = [t.median for t in self.timings]
        return min(meds), max(meds)

    @property
    def gib_s(self) -> float:
        return self.nbytes / GiB / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.lo_hi
        return {
            "group": self.group,
            "mode": self.mode,
            "contender": self.name,
            "kind": self.kind,
            "bytes": self.nbytes,
            "seconds": self.seconds,
            "min_s": lo,
            "max_s": hi,
            "gib_s": self.gib_s,
            "ratio_limit": self.ratio_limit,
            "ratio_best_peer": self.ratio_peer,
            "peak_device_bytes": self.peak_device_bytes,
            "note": self.note,
            "runs": [
                {"name": t.name, "bytes": t.nbytes, "seconds": t.runs, **t.extra}
                for t in self.timings
            ],
        }


@dataclasses.dataclass
class Group:
    title: str  # e.g. "full load, world=1"
    mode: str
    limit: str | None = None  # name of the row the "× limit" column divides by
    rows: list[Row] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (who, why)

    def row(self, name: str) -> Row | None:
        return next((r for r in self.rows if r.name == name), None)

    def rate(self) -> None:
        """Fill each row's ratio to the limit and to the best peer."""
        lim = self.row(self.limit) if self.limit else None
        peers = [r for r in self.rows if r.kind == "peer"]
        best = min(peers, key=lambda r: r.seconds) if peers else None
        for r in self.rows:
            r.ratio_limit = r.gib_s / lim.gib_s if lim is not None and r is not lim else None
            if best is not None and r.kind != "limit":
                r.ratio_peer = best.seconds / r.seconds

    @property
    def best_peer(self) -> Row | None:
        peers = [r for r in self.rows if r.kind == "peer"]
        return min(peers, key=lambda r: r.seconds) if peers else None


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GiB:.2f}"


def _s(x: float) -> str:
    """Seconds to 3 significant digits: 12.3, 0.246, 0.00123."""
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def skipped_lines(skipped: list[tuple[str, str]]) -> list[str]:
    """One line per reason: ``- not run: A, B (why)``."""
    by: dict[str, list[str]] = {}
    for who, why in skipped:
        by.setdefault(why, []).append(who)
    return [f"- not run: {', '.join(who)} ({why})" for why, who in by.items()]


def markdown(groups: list[Group], device_col: bool) -> str:
    out = []
    for g in groups:
        g.rate()
        bp = g.best_peer
        head = f"### {g.title} — {g.mode}"
        facts = []
        if g.limit and g.row(g.limit):
            facts.append(f"limit: {g.limit}")
        if bp is not None:
            facts.append(f"best peer: {bp.name}")
        out.append(head + (f" ({'; '.join(facts)})" if facts else ""))
        out.append("")
        cols = ["contender", "median s (min–max)", "GiB/s", "× limit", "× best peer"]
        # Device-wide peak while the row's warm runs ran (bench.gpu.PeakMemory);
        # "n/a" without a GPU, "—" where nothing was sampled (limits, cold).
        cols += ["device peak GiB"]
        cols += ["page cache before runs"]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in g.rows:
            lo, hi = r.lo_hi
            cells = [
                r.name if r.kind != "limit" else f"*{r.name}*",
                f"{_s(r.seconds)} ({_s(lo)}–{_s(hi)})",
                f"{r.gib_s:.2f}",
                "—" if r.ratio_limit is None else f"{r.ratio_limit:.2f}",
                "—" if r.ratio_peer is None else f"{r.ratio_peer:.2f}",
            ]
            cells += [_gib(r.peak_device_bytes) if device_col else "n/a"]
            cells += [_residency([b for t in r.timings for b in t.extra.get("before", [])])]
            out.append("| " + " | ".join(cells) + " |")
        if g.skipped:
            out += ["", *skipped_lines(g.skipped)]
        out.append("")
    return "\n".join(out)


def write_json(path: Path, doc: dict[str, Any], groups: list[Group]) -> None:
    doc = dict(doc)
    doc["groups"] = [
        {
            "title": g.title,
            "mode": g.mode,
            "limit": g.limit,
            "best_peer": g.best_peer.name if g.best_peer else None,
            "rows": [r.to_dict() for r in g.rows],
            "skipped": [{"contender": w, "reason": y} for w, y in g.skipped],
        }
        for g in groups
    ]
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def plot(path: Path, groups: list[Group], title: str) -> str | None:
    """GiB/s per contender per group, one panel per mode, min–max as error
    bars, each group's limit as a black tick. None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; also what the tests need
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not installed (pip install 'gpuload[bench]'): {e}"
    modes = [m for m in ("warm", "cold") if any(g.mode == m and g.rows for g in groups)]
    if not modes:
        return "nothing was measured"
    names = list(dict.fromkeys(r.name for g in groups for r in g.rows if r.kind != "limit"))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    ncols = max(len([g for g in groups if g.mode == m and g.rows]) for m in modes)
    fig, axes = plt.subplots(
        len(modes), 1, figsize=(max(9, 1.6 * ncols + 4), 4.5 * len(modes)), squeeze=False
    )
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        gs = [g for g in groups if g.mode == mode and g.rows]
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            xs, ys, err = [], [], [[], []]
            for j, g in enumerate(gs):
                r = g.row(n)
                if r is None:
                    continue
                lo, hi = r.lo_hi
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(r.gib_s)
                err[0].append(r.gib_s - r.nbytes / GiB / hi)
                err[1].append(r.nbytes / GiB / lo - r.gib_s)
            if xs:
                ax.bar(xs, ys, width, yerr=err, capsize=2, color=colors[n], label=n)
        for j, g in enumerate(gs):
            lim = g.row(g.limit) if g.limit else None
            if lim is not None:
                ax.hlines(lim.gib_s, j - 0.45, j + 0.45, colors="black", linewidth=2)
        ax.set_xticks(range(len(gs)), [g.title for g in gs], rotation=20, ha="right")
        ax.set_ylabel("GiB/s")
        ax.set_title(f"{title} — {mode} (black: the limit)")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
