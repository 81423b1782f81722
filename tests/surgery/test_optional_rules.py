"""A timm without one of the modules kapify has rules for loses those rules only, and says so."""

import json
import subprocess
import sys

import pytest

SIMULATE = r"""
import json, sys, warnings
import timm, timm.models.shvit
from timm.models.shvit import SHSA
from timm.models.cspnet import CrossStage
from timm.layers import Attention
sys.modules["timm.models.shvit"] = None  # from here on, importing timm.models.shvit fails as in a timm before 1.0.16
import kapify
from kapify.surgery.channels.blocks import block_handler
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kapify.convert(timm.create_model("resnet18", num_classes=10), grid="rect")
    kapify.convert(timm.create_model("resnet18", num_classes=10), grid="rect")
print(json.dumps({
    "skipped": [r["path"] for r in kapify.diagnostics()["skipped_rules"]],
    "versions": kapify.diagnostics()["versions"],
    "shsa": block_handler(SHSA) is not None,
    "cross_stage": block_handler(CrossStage) is not None,
    "attention": block_handler(Attention) is not None,
    "warnings": [str(w.message) for w in caught if "left out" in str(w.message)],
}))
"""


@pytest.mark.slow  # over 10 s on the 2-core machine: the full run (CI) only
def test_a_missing_timm_module_costs_only_its_own_rules_and_warns_once():
    import kapify

    already = [r["path"] for r in kapify.diagnostics()["skipped_rules"]]  # none with the pinned versions
    done = subprocess.run([sys.executable, "-c", SIMULATE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(found["skipped"]) == sorted(already + ["timm.models.shvit:SHSA"])
    assert not found["shsa"] and found["cross_stage"] and found["attention"]  # its neighbours are still registered
    assert len(found["warnings"]) == 1  # once per process, at the first conversion
    message = found["warnings"][0]
    assert "timm.models.shvit:SHSA" in message and "block_handler shvit_attention" in message
    assert f"timm {found['versions']['timm']}" in message


def test_only_classes_the_installed_versions_lack_are_left_out():
    import importlib

    import timm
    from packaging.version import Version

    import kapify

    skipped = kapify.diagnostics()["skipped_rules"]
    for rule in skipped:
        module, _, name = rule["path"].partition(":")
        try:
            assert not hasattr(importlib.import_module(module), name), rule
        except ImportError:
            pass
    if Version(timm.__version__) >= Version("1.0.31"):  # the pinned set (scripts/setup.sh) has every class
        assert skipped == []
