"""The house's import layers (pyproject.toml [tool.importlinter], DESIGN.md) hold, checked from pytest so that
`make test` and CI fail when an import breaks a layer or ties two packages both ways."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_the_contracts_catch_an_import_that_breaks_a_layer(tmp_path):
    """The same contracts on a copy of the package in which the pure-torch EMA imports a LightningModule."""
    shutil.copytree(REPO / "gen_lightning", tmp_path / "gen_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    ema = tmp_path / "gen_lightning" / "nn" / "ema.py"
    ema.write_text(ema.read_text() + "\nfrom gen_lightning.models.base import GenerativeModule  # noqa: E402, F401\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "gen_lightning.nn.ema -> gen_lightning.models.base" in done.stdout, done.stdout[-4000:]


def test_no_contract_is_waived():
    """The contracts hold without exceptions: an import that breaks a layer is moved, not listed as ignored."""
    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert len(contracts) == 8
    assert [c["id"] for c in contracts if c.get("ignore_imports")] == []
