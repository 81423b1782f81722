"""The README and docs/*.md: every relative link resolves, and the README stays a front page."""

import re

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    broken = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not broken, f"{page.name}: {broken}"


def test_readme_is_a_front_page_with_the_two_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 8192
    assert "bash scripts/setup.sh && .venv/bin/kapify convert resnet18" in text
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q" in text


def test_the_readme_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes kap.safetensors
    example = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    exec(compile(example, "README.md", "exec"), {"__name__": "readme_example"})
    assert "parameters:" in capsys.readouterr().out and (tmp_path / "kap.safetensors").is_file()


def test_every_test_the_fault_matrix_names_exists():
    """docs/reliability.md names a test per row (``tests/x.py::name``, or ``::name`` after the previous file)."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    missing, current = [], None
    for path, name in re.findall(r"`(tests/[\w/]+\.py)?(?:::(\w+))?", text):
        if not (path or name):
            continue  # some other code span
        current = path or current
        if not (ROOT / current).is_file():
            missing.append(current)
        elif name and not re.search(rf"^def {name}\(", (ROOT / current).read_text(), re.M):
            missing.append(f"{current}::{name}")
    assert not missing and current is not None, missing
