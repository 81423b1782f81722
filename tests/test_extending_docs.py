"""docs/extending.md: every example runs (each registers inside kapify.extend.scoped(), so none leaks)."""

import re

import pytest

import kapify
from tests.helpers import ROOT

EXAMPLES = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "extending.md").read_text(), re.S)


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_the_extending_example_runs_and_leaves_nothing_registered(index):
    before = kapify.extend.registered()
    with kapify.extend.scoped():
        exec(compile(EXAMPLES[index], f"docs/extending.md example {index + 1}", "exec"), {"__name__": "docs_example"})
        assert len(kapify.extend.registered()) > len(before)  # it registered something
    assert kapify.extend.registered() == before


def test_the_page_has_an_example_per_kind_that_registers():
    kinds = ["register_conv_type", "register_channel_handler", "register_leaf_module", "register_layer_rule"]
    kinds.append("register_node_rule")
    assert all(any(kind in example for example in EXAMPLES) for kind in kinds)
