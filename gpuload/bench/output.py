"""Writes a bench's three outputs and prints the table: ``NAME.md``,
``NAME.json`` (every raw run, the machine) and ``NAME.png``, where NAME is
``gpuload-bench-PRESET-DEVICE``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuload.bench import goals as _goals
from gpuload.bench import report as _report
from gpuload.bench import scaling as _scaling
from gpuload.bench.args import command
from gpuload.bench.presets import device_plan
from gpuload.bench.timing import GiB, machine

if TYPE_CHECKING:
    from gpuload.bench.runner import Bench


def _summary(m: dict[str, Any]) -> str:
    gpu = m.get("gpu") or {}
    st = m.get("storage") or {}
    bits = [
        f"CPU {m['cpu']} ({m['cpus']} cpus)",
        f"RAM {(m['ram_bytes'] or 0) / GiB:.0f} GiB",
        f"storage {st.get('fstype', '?')} on {st.get('device', '?')}"
        + (f" ({st['model']})" if st.get("model") else ""),
    ]
    if gpu:
        bits.insert(0, f"GPU {gpu.get('name')} (driver {gpu.get('driver')})")
    pk = m["packages"]
    bits.append(", ".join(f"{k} {v}" for k, v in pk.items() if v))
    return "; ".join(bits)


def budget_lines(b: Bench) -> list[str]:
    """The preset's device budget against the measured peaks (GPU runs)."""
    p = b.preset
    if p.device_budget is None or b.gpu is None:
        return []
    plan = device_plan(p)
    lines = [
        "### Device memory budget",
        "",
        f"- planned: dense {plan['dense'] / GiB:.2f} GiB, MoE {plan['moe'] / GiB:.2f} GiB "
        f"on the device ({plan['moe_experts_host'] / GiB:.2f} GiB of experts in host memory); "
        f"budget {p.device_budget / GiB:.0f} GiB",
    ]
    # Every contender, peers included: the budget is what the card must hold
    # for the whole run, and a peer that does not fit fails the run there.
    for g in b.groups:
        for r in g.rows:
            if r.kind != "limit" and r.peak_device_bytes:
                ok = "within" if r.peak_device_bytes <= p.device_budget else "OVER"
                lines.append(
                    f"- measured peak, {r.name}, {g.title} ({g.mode}): "
                    f"{r.peak_device_bytes / GiB:.2f} GiB ({ok} budget)"
                )
    return lines + [""]


def write_outputs(b: Bench) -> int:

    out = Path(b.args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpuload-bench-{b.preset.name}-{'gpu' if b.gpu else 'cpu'}"
    data_dir = next(iter(b.paths.values()), None) or "."
    m = machine(data_dir, b.gpu.facts() if b.gpu else None)
    cmd = command(b.args)
    table = _report.markdown(b.groups, device_col=b.gpu is not None)
    goal_results = _goals.evaluate(b.groups)
    scaling = _scaling.rows(b.groups, _goals.FULL, b.scaling_plans())
    skipped = sorted(set(b.skipped_everywhere))
    md = [
        f"## gpuload bench, preset {b.preset.name}, device {b.device}",
        "",
        f"`{cmd}`",
        "",
        f"Machine: {_summary(m)}",
        "",
        f"Median of {b.runs} runs after {b.warmup} warm-up (min–max in brackets; for a "
        "mean over ranks, the mean of the ranks' medians, fastest–slowest rank). "
        "GiB/s = bytes delivered / median s. × limit: GiB/s over the group's limit; "
        "× best peer: the best peer's time over this row's. Contenders ran in turn "
        "(A B C, B C A, ...), limits before them. Page cache before runs: the files' "
        "residency (mincore) right before each timed run: warm, the lowest any run started "
        "with (files with missing pages are read back in first, and counted as re-warmed); "
        "cold, the most left after eviction.",
        "",
        table,
        _scaling.markdown(scaling),
        _goals.markdown(goal_results),
        "",
        *budget_lines(b),
    ]
    if skipped:
        md += ["### Not run here (any scenario)", ""] + _report.skipped_lines(skipped) + [""]
    if b.notes:
        md += ["### Notes", ""] + [f"- {n}" for n in b.notes] + [""]
    if b.failed:
        md += ["### FAILURES", ""] + [f"- {f}" for f in b.failed] + [""]
    plot_path = out / f"{stem}.png"
    why_no_plot = "--no-plot" if b.args.no_plot else _report.plot(
        plot_path, b.groups, f"gpuload bench {b.preset.name} ({b.device})"
    )  # fmt: skip
    if why_no_plot:
        md += [f"(no plot: {why_no_plot})", ""]
    scaling_png = out / f"{stem}-scaling.png"
    why_no_scaling_plot = "--no-plot" if b.args.no_plot else _scaling.plot(
        scaling_png, scaling, f"gpuload bench {b.preset.name} ({b.device})"
    )  # fmt: skip
    if why_no_scaling_plot:
        md += [f"(no scaling plot: {why_no_scaling_plot})", ""]
    text = "\n".join(md)
    (out / f"{stem}.md").write_text(text)
    doc = {
        "command": cmd,
        "preset": b.preset.name,
        "device": b.device,
        "runs": b.runs,
        "warmup": b.warmup,
        "threads": b.threads,
        "dtype": b.dtype,
        "machine": m,
        "models": b.models,
        "device_plan": device_plan(b.preset),
        "goals": goal_results,
        "skipped": [{"contender": w, "reason": y} for w, y in skipped],
        "notes": b.notes,
        "failed": b.failed,
        "plot": None if why_no_plot else plot_path.name,
        "scaling": scaling,
        "scaling_plot": None if why_no_scaling_plot else scaling_png.name,
        "markdown": text,
    }
    _report.write_json(out / f"{stem}.json", doc, b.groups)
    print()
    print(text)
    written = [f"{stem}.md", f"{stem}.json"] + ([] if why_no_plot else [f"{stem}.png"])
    written += [] if why_no_scaling_plot else [scaling_png.name]
    print(f"wrote {', '.join(str(out / w) for w in written)}")
    return 1 if b.failed else 0
