"""Every paper recipe says, in its header, which official code (and commit) it follows and what still deviates;
the README's method table links every shipped recipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "fastkd" / "recipes").glob("*.yaml"))
PAPER = [p for p in RECIPES if not p.stem.endswith("_tiny")]


def _header(path: Path) -> str:
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        out.append(line[1:].strip())
    return " ".join(out)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_recipe_header_names_source_commit_and_deviations(path):
    header = _header(path)
    assert re.search(r"(Follows|Recipe:) [\w.-]+/[\w.-]+ @ [0-9a-f]{7}", header), header[:200]
    assert "deviation" in header.lower(), header[:200]


def test_readme_method_table_links_every_recipe():
    readme = (ROOT / "README.md").read_text()
    for path in PAPER + [ROOT / "fastkd" / "recipes" / "supervised_tiny.yaml"]:
        assert f"](fastkd/recipes/{path.name})" in readme, path.name
