"""The shape of the package: imports only point down (the import-linter contract in pyproject.toml, no exceptions),
and the code is ruff-clean (pyflakes, import order, bugbear)."""

from __future__ import annotations

import shutil
import subprocess

from support.env import subprocess_env
from support.paths import REPO_ROOT


def lint_imports(root) -> subprocess.CompletedProcess:
    return subprocess.run(["lint-imports", "--no-cache"], cwd=root, env=subprocess_env(PYTHONPATH=str(root)),
                          capture_output=True, text=True, timeout=120)


def test_imports_only_point_down():
    proc = lint_imports(REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "longctx imports only point down KEPT" in proc.stdout and "Contracts: 1 kept, 0 broken." in proc.stdout


def test_the_contract_refuses_an_upward_import(tmp_path):
    """The check is not vacuous: the data path importing the evaluation's report (a layer above) breaks it."""
    shutil.copytree(REPO_ROOT / "longctx", tmp_path / "longctx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / "longctx" / "data" / "dataset.py").open("a") as f:
        f.write("\nfrom ..eval import report  # noqa: E402, F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "longctx imports only point down BROKEN" in proc.stdout
    assert "longctx.data.dataset -> longctx.eval.report" in proc.stdout


def test_ruff_is_clean():
    proc = subprocess.run(["ruff", "check", "--no-cache", "."], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout.strip()) == (0, "All checks passed!"), proc.stdout + proc.stderr
