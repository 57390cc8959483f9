"""The issue's goals, as ratios measured in this run.

Each goal compares a gpuload row with its group's limit or with a peer in
the same group; a goal whose rows were not measured says which is missing.
"""

from __future__ import annotations

import dataclasses

from gpuload.bench.report import Group

FULL = "full load, world=1"
W8 = "world=8, rank 0"
BEST = "the best peer"  # Goal.against: the group's fastest peer, whichever it is


@dataclasses.dataclass(frozen=True)
class Goal:
    text: str
    group: str
    mode: str
    against: str | None  # a row name; None: the group's limit
    target: float
    speedup: bool  # True: other's seconds / ours; False: our GiB/s / other's


GOALS = (
    Goal("full load >= 0.9x the limit ({against})", FULL, "warm", None, 0.9, False),
    Goal("full load >= 3x safetensors", FULL, "warm", "safetensors", 3.0, True),
    Goal("full load >= 1.2x fastsafetensors", FULL, "warm", "fastsafetensors", 1.2, True),
    Goal("full load >= 1.2x InstantTensor", FULL, "warm", "InstantTensor", 1.2, True),
    Goal("world=8 rank time <= 1.3x shard bytes / {against}", W8, "warm", None, 1 / 1.3, False),
    Goal("world=8 rank 0 >= 5x the vLLM-style loader", W8, "warm", "vLLM-style", 5.0, True),
    Goal("world=8 rank 0 >= 1.5x safetensors get_slice", W8, "warm", "safetensors", 1.5, True),
    Goal("cold full load >= 1.0x fio", FULL, "cold", "fio", 1.0, False),
    Goal("cold full load >= 1.1x the best peer ({against})", FULL, "cold", BEST, 1.1, True),
)


def evaluate(groups: list[Group]) -> list[dict]:
    """One entry per goal and gpuload row: ratio, target, met, or why not measured."""
    out = []
    for goal in GOALS:
        g = next((x for x in groups if x.title == goal.group and x.mode == goal.mode), None)
        mine = [r for r in g.rows if r.kind == "gpuload"] if g else []
        against = goal.against or (g.limit if g else None)
        if against == BEST:
            best = g.best_peer if g else None
            against = best.name if best else None
        other = g.row(against) if g and against else None
        text = goal.text.format(against=against or goal.against or "limit")
        if not mine or other is None:
            missing = "gpuload" if not mine else (against or "the limit")
            why = f"not measured ({missing} has no row in '{goal.group}' {goal.mode})"
            out.append({"goal": text, "contender": None, "ratio": None, "met": None, "why": why})
            continue
        for r in mine:
            ratio = other.seconds / r.seconds if goal.speedup else r.gib_s / other.gib_s
            out.append(
                {
                    "goal": text,
                    "contender": r.name,
                    "ratio": ratio,
                    "target": goal.target,
                    "met": ratio >= goal.target,
                }
            )
    return out


def markdown(results: list[dict]) -> str:
    lines = ["### Goals (ratios in this run)", ""]
    for e in results:
        if e["ratio"] is None:
            lines.append(f"- {e['goal']}: {e['why']}")
            continue
        verdict = "met" if e["met"] else "NOT met"
        if "<=" in e["goal"]:  # a time goal: show it the way it is stated
            shown = f"time ratio {1 / e['ratio']:.2f} (target <= {1 / e['target']:.2f})"
        else:
            shown = f"{e['ratio']:.2f} (target >= {e['target']:.2f})"
        lines.append(f"- {e['goal']} — {e['contender']}: {shown}, {verdict}")
    return "\n".join(lines)
