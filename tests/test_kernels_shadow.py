"""The repository's ``kernels/`` folder never shadows the PyPI package ``kernels``.

transformers (≥ 5.25) imports the PyPI package ``kernels``. Any Python started
in the repository root (pytest via ``python -m``, ``python -c``, the examples,
the bench scripts) has that root on ``sys.path``; were ``kernels/`` a regular
package, it would be imported instead and transformers would fail with
``cannot import name 'CUDAProperties' from 'kernels'``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from pathlib import Path
root = Path.cwd().resolve()
assert sys.path[0] in ("", str(root)), sys.path[:2]
import kernels
where = Path(kernels.__file__ or "").resolve()
assert root / "kernels" not in where.parents, f"top-level kernels is the repository's: {where}"
assert "site-packages" in where.parts, where
import transformers
transformers.LlamaConfig()
import gpuload.kernels.host as host
assert Path(host.__file__).resolve() == root / "kernels" / "host.py", host.__file__
print("ok", where)
"""


def test_pypi_kernels_is_imported_from_site_packages_in_the_repo_root():
    for argv in ([sys.executable, "-c", PROBE], [sys.executable, "-"]):
        run = subprocess.run(
            argv,
            cwd=ROOT,
            input=PROBE if argv[-1] == "-" else None,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.startswith("ok"), run.stdout
