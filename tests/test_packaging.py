"""A regular (non-editable) install ships every subpackage, the kernels folder as fastkd.kernels, and recipes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_every_package_and_recipe(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    out = subprocess.run([*cmd, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("fastkd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"fastkd/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    for pkg in (ROOT / "fastkd").rglob("__init__.py"):
        folder = pkg.parent.relative_to(ROOT)
        expected |= {str(folder / p.name) for p in pkg.parent.glob("*.py")}
    expected |= {f"fastkd/recipes/{p.name}" for p in (ROOT / "fastkd" / "recipes").glob("*.yaml")}
    missing = sorted(expected - names)
    assert not missing, f"the wheel lacks {missing[:10]} (update [tool.setuptools] packages in pyproject.toml)"
    assert any(n.endswith("entry_points.txt") for n in names)
