"""The README's code blocks run as written, in order, as a user copies them.

Every ``python`` and ``sh`` block of README.md runs, top to bottom, in one
fresh working folder that holds the clone's ``examples/`` (as a user in the
clone has them), with this environment's ``python``, ``gpuload`` and
``torchrun`` first on ``PATH``. A block preceded by
``<!-- readme-test: skip: REASON -->`` is not run, and the reason must say
why (a GPU, the network, or the commands that run this very test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(
    r"(?:<!-- readme-test: skip: (?P<skip>[^>]+?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```",
    re.S,
)


def blocks(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, skip reason or None) of every fenced block."""
    return [(m["lang"], m["body"], m["skip"]) for m in FENCE.finditer(text)]


def test_the_block_parser_sees_every_fence():
    text = (ROOT / "README.md").read_text()
    assert len(blocks(text)) == text.count("```") // 2
    assert all(lang in ("python", "sh") for lang, _, _ in blocks(text)), "unlabelled block"


def test_every_readme_block_runs_as_written(tmp_path):
    pytest.importorskip("torch", reason="the torchrun block needs torch (make test installs it)")
    found = blocks((ROOT / "README.md").read_text())
    run = [(lang, body) for lang, body, skip in found if skip is None]
    skipped = [skip for _, _, skip in found if skip is not None]
    assert len(run) >= 4 and len(skipped) <= 2, (len(run), skipped)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    bindir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "GPULOAD_PROGRESS": "0",
    }
    for i, (lang, body) in enumerate(run):
        argv = ["bash", "-euo", "pipefail", "-c", body] if lang == "sh" else [sys.executable, "-"]
        p = subprocess.run(
            argv,
            input=body if lang == "python" else None,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert p.returncode == 0, f"block {i} ({lang}):\n{body}\n--- out:\n{p.stdout}\n{p.stderr}"
