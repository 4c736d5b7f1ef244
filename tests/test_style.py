"""The package is formatted by the formatter (ruff, pinned in .ci/constraints.txt), not opted out of it line by line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cyb_lightning"


def test_the_package_is_formatted_and_opts_out_nowhere():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[test]' (make setup) installs it")
    check = subprocess.run([ruff, "format", "--check", str(PACKAGE)], capture_output=True, text=True)
    assert check.returncode == 0, f"run `ruff format cyb_lightning`:\n{check.stdout}{check.stderr}"
    skips = [f"{p.relative_to(PACKAGE.parent)}:{i}" for p in PACKAGE.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if "fmt: skip" in line or "fmt: off" in line]  # fmt: skip
    assert not skips, f"formatter opt-outs: {skips}"
