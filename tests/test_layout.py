"""The package's layout keeps showing the pipeline (docs/architecture.md).

- at most 12 modules at gpuload/'s top level, the rest in stage packages;
- no module over 400 lines in gpuload/ or kernels/, each opening with a
  docstring that says what it is for;
- every kernels/ source is linked from gpuload/kernels/ (what the wheel and
  import-linter see);
- the import contract in pyproject.toml holds, and it is not vacuous: a copy
  of the package with a cycle or an upward import breaks it;
- every ``gpuload.x.y`` and every source file the README and docs/ name exists.
"""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "gpuload"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
needs_linter = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _modules() -> list[Path]:
    # gpuload/kernels/*.py are links to kernels/*.py: count each file once.
    files = [p for p in PKG.rglob("*.py") if not p.is_symlink()]
    return sorted(files + list((ROOT / "kernels").glob("*.py")))


def test_at_most_twelve_top_level_modules():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 12, top


def test_no_module_over_400_lines_and_each_says_what_it_is_for():
    long, silent = [], []
    for p in _modules():
        text = p.read_text()
        if text.count("\n") > 400:
            long.append(f"{p.relative_to(ROOT)}: {text.count(chr(10))} lines")
        doc = ast.get_docstring(ast.parse(text))
        if not doc or not doc.strip().splitlines()[0].strip():
            silent.append(str(p.relative_to(ROOT)))
    assert not long, long
    assert not silent, f"no module docstring: {silent}"


def test_every_kernel_source_is_linked_into_the_package():
    sources = {p.name for p in (ROOT / "kernels").glob("*.py")}
    links = {p.name: p for p in (PKG / "kernels").glob("*.py") if p.is_symlink()}
    assert set(links) == sources
    for name, link in links.items():
        assert link.resolve() == (ROOT / "kernels" / name).resolve(), link
    assert not (ROOT / "kernels" / "__init__.py").exists()  # would shadow PyPI's kernels


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120
    )


@needs_linter
def test_the_import_contract_holds():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout, out.stdout


def _copy(tmp_path: Path) -> Path:
    """A copy of the package (links resolved) and the contract, importable
    from ``tmp_path`` ahead of the installed one."""
    shutil.copytree(PKG, tmp_path / "gpuload", symlinks=False)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


@needs_linter
@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # the cycle of the old kernels/: the toolchain check importing the launcher
        ("kernels/toolchain.py", "from gpuload.kernels import cuda", "gpuload.kernels"),
        # the old bench cycle: output importing the runner back
        ("bench/output.py", "from gpuload.bench import runner", "gpuload.bench"),
        # a low stage reaching up: the format stage importing the loader
        ("format/dtypes.py", "import gpuload.loader", "gpuload.format is not allowed"),
        # siblings of one layer may import each other, but never both ways
        ("read/workers.py", "import gpuload.host.pipeline", "No cycles are allowed in gpuload"),
    ],
)
def test_the_contract_catches(tmp_path, module, line, broken):
    root = _copy(tmp_path)
    target = root / "gpuload" / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    out = _lint(root)
    assert str(root) in _where_lint_imports_found(root), "linted the installed package"
    assert out.returncode != 0, out.stdout
    assert broken in out.stdout, out.stdout


def _where_lint_imports_found(root: Path) -> str:
    # lint-imports puts its working directory first on sys.path, as this does.
    code = (
        "import sys, importlib.util as u; sys.path.insert(0, '.'); "
        "print(u.find_spec('gpuload').origin)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout


# -- documented names ------------------------------------------------------

_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_DOTTED = re.compile(r"(?<![\w/.-])gpuload(?:\.[A-Za-z_]\w*)+")
_FROM = re.compile(r"^\s*from (gpuload(?:\.\w+)*) import ([\w, ()]+)$", re.M)


def _documented() -> set[str]:
    names: set[str] = set()
    for doc in _DOCS:
        text = doc.read_text()
        names.update(m.group(0).rstrip(".") for m in _DOTTED.finditer(text))
        for mod, imported in _FROM.findall(text):
            for name in re.split(r"[,\s()]+", imported):
                if name and name != "as":
                    names.add(f"{mod}.{name}")
    return names


def test_documented_files_exist():
    paths = re.compile(r"(?<![\w/.-])((?:gpuload|kernels|bench|examples|tests)/[\w/]+\.(?:py|sh))")
    missing = [
        f"{doc.name}: {m}" for doc in _DOCS for m in paths.findall(doc.read_text())
        if not (ROOT / m).exists()
    ]  # fmt: skip
    assert not missing, missing


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name and not dotted.startswith(e.name):
                raise  # a dependency missing, not a wrong path
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_documented_names_exist():
    names = _documented()
    assert {"gpuload.load_sharded", "gpuload.torch.load_into", "gpuload.sharding"} <= names
    missing = []
    for dotted in sorted(names):
        if dotted.startswith("gpuload.integrations.vllm"):
            continue  # imports vLLM: tests/vllm_tier checks the plug-in
        try:
            _resolve(dotted)
        except (ImportError, AttributeError) as e:
            missing.append(f"{dotted}: {type(e).__name__}: {e}")
    assert not missing, "\n".join(missing)
