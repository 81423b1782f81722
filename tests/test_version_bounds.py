"""The lowest supported versions are declared once in pyproject.toml and installed as such by CI."""

import re

from tests.helpers import ROOT


def test_ci_installs_exactly_pyprojects_lower_bounds():
    declared = dict(re.findall(r'"(torch|torchvision|timm)>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()))
    installed = dict(
        re.findall(r'"(torch|torchvision|timm)==([0-9.]+)"', (ROOT / "scripts" / "setup_lowest.sh").read_text())
    )
    assert set(declared) == {"torch", "torchvision", "timm"}
    pad = lambda v: tuple(int(p) for p in v.split(".")) + (0,) * (3 - len(v.split(".")))  # noqa: E731
    assert {k: pad(v) for k, v in declared.items()} == {k: pad(v) for k, v in installed.items()}
    assert "setup_lowest.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_package_version_is_pyprojects():
    import kapify

    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert kapify.__version__ == declared
