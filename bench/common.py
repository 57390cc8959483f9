"""Timing and reporting for the scripts in bench/. The timing and the machine
record live in :mod:`gpuload.bench.timing` (``gpuload bench`` ships in the
package); the table here is ``bench/cpu.py``'s."""

from __future__ import annotations

from gpuload.bench.timing import GiB, Timing, machine, measure

__all__ = ["GiB", "Timing", "machine", "markdown", "measure"]


def markdown(rows: list[Timing], limit: Timing | None, peers: dict[str, str]) -> str:
    """A Markdown table; ``peers`` maps a contender to the peer it is compared with."""
    by = {r.name: r for r in rows}
    out = ["| contender | median s (min-max) | GiB/s | × limit | × peer |", "|---|---|---|---|---|"]
    for r in rows:
        lim = f"{r.gib_s / limit.gib_s:.2f}" if limit and r is not limit else "—"
        peer = peers.get(r.name)
        vs = f"{by[peer].median / r.median:.2f} (vs {peer})" if peer in by else "—"
        out.append(f"| {r.name} | {r.median:.3f} ({r.spread}) | {r.gib_s:.2f} | {lim} | {vs} |")
    return "\n".join(out)
