"""Properties of convert, rewiden, fold and save/load on random small CNNs nobody wrote a rule for (issue 31).

Fast suite: a few dozen examples per property (about a minute). Thousands:
    KAPIFY_ARCH_EXAMPLES=2000 python -m pytest tests/surgery/test_architecture_properties.py -p no:cacheprovider
Each failure hypothesis shrank is kept below as a named regression test.
"""

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import kapify
from kapify.surgery.kap_conv import is_kap_conv
from kapify.surgery.rewiden import RewidenError
from kapify.surgery.tracing import TracingError
from tests.architectures import RandomCNN, architectures

EXAMPLES = int(os.environ.get("KAPIFY_ARCH_EXAMPLES", "25"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
X = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
KAPIFY_ERRORS = (RewidenError, TracingError, ValueError, TypeError, NotImplementedError)


def _model(arch):
    torch.manual_seed(0)
    model = RandomCNN(arch).double().eval()
    for m in model.modules():  # non-trivial running statistics: BatchNorm's eval function is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _refusal_is_specific(err: Exception) -> None:
    """A refusal is kapify's own error with a reason, never an internal crash or a broken forward."""
    assert not isinstance(err, (KeyError, IndexError, AttributeError)), f"internal error: {err!r}"
    assert "broke the model's forward" not in str(err), str(err)


def check_rewiden_preserves_function(arch) -> None:
    model = _model(arch)
    want = model(X)
    try:
        wide = kapify.rewiden(model, "square", function_preserving=True, example_input=X)
    except KAPIFY_ERRORS as err:
        _refusal_is_specific(err)
        return
    torch.testing.assert_close(wide.eval()(X), want, rtol=1e-9, atol=1e-9)


def check_identity_convert_preserves_function(arch) -> None:
    """K=1 without noise is the plain function; on square grids except where convert says it re-widened across a
    LayerNorm/GroupNorm (whose statistics then see the new channels: by design, and reported in the summary)."""
    model = _model(arch)
    want = model(X)
    for grid in ("square", "rect"):
        kap = kapify.convert(model, k=1, sigma=0.0, input_noise=False, grid=grid, example_input=X).eval()
        if not kapify.get_config(kap).widened_across_norm:
            torch.testing.assert_close(kap(X), want, rtol=1e-9, atol=1e-9)


def check_kap_conversion(arch, grid: str, tmp_path) -> None:
    model = _model(arch)
    before = copy.deepcopy(model.state_dict())
    try:
        kap = kapify.convert(model, k=3, sigma=0.1, grid=grid, example_input=X)
    except KAPIFY_ERRORS as err:
        _refusal_is_specific(err)
        return
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    convs = [m for m in kap.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(is_kap_conv(m) for m in convs)  # every conv converted
    kap.eval()
    out = kap(X)
    torch.testing.assert_close(kap(X), out, rtol=0, atol=0)  # eval is deterministic
    trained = copy.deepcopy(kap).train()  # a copy: training updates BatchNorm's statistics
    first = next(m for m in trained.modules() if is_kap_conv(m))
    seen = []
    first.register_forward_hook(lambda module, inputs, output: seen.append(output))
    torch.manual_seed(1)
    trained(X)
    trained(X).square().sum().backward()
    assert not torch.equal(seen[0], seen[1])  # training draws noise after the first conv
    assert all(torch.isfinite(p.grad).all() for p in trained.parameters() if p.grad is not None)
    kap.eval()
    torch.testing.assert_close(kapify.fold(kap).eval()(X), out, rtol=1e-9, atol=1e-9)
    kapify.save(kap, tmp_path / "m.safetensors")
    back = kapify.load(tmp_path / "m.safetensors", model=RandomCNN(arch).double()).eval()
    torch.testing.assert_close(back(X), out, rtol=1e-9, atol=1e-9)


@PROPERTY
@given(architectures())
def test_rewiden_keeps_the_function_or_refuses_with_a_reason(arch):
    check_rewiden_preserves_function(arch)


@PROPERTY
@given(architectures())
def test_convert_with_k1_and_no_noise_keeps_the_function(arch):
    check_identity_convert_preserves_function(arch)


@pytest.mark.parametrize("grid", ["square", "rect", "line"])
@settings(PROPERTY, max_examples=max(1, EXAMPLES // 3))
@given(arch=architectures(max_blocks=4))
def test_kap_conversion_properties(arch, grid, tmp_path_factory):
    check_kap_conversion(arch, grid, tmp_path_factory.mktemp("arch"))


# Shrunk failures the properties found, kept as regression tests (each failed before its fix).
GROUPED_RESIDUAL_THEN_SHUFFLE = {
    "stem": 4,
    "blocks": [{"block": "residual", "mid": 2, "groups": 2, "act": "relu", "project": False, "c_out": 4},
               {"block": "shuffle", "groups": 2, "c_out": 4}],
    "head": "linear",
}  # fmt: skip  # KeyError in width_plan.growth_limits: a grouped conv whose input group was cut into segments
CHUNK_ADDED_BACK = {
    "stem": 2,
    "blocks": [{"block": "split", "how": "chunk", "first": 1, "merge": "add", "groups": 1, "c_out": 1}],
    "head": "linear",
}  # 1-channel halves added back were taken for a broadcast: "re-widening broke the model's forward"


@pytest.mark.parametrize(
    "arch", [GROUPED_RESIDUAL_THEN_SHUFFLE, CHUNK_ADDED_BACK], ids=["grouped-shuffle", "chunk-add"]
)
def test_regressions_rewiden_and_convert(arch, tmp_path):
    check_rewiden_preserves_function(arch)
    check_identity_convert_preserves_function(arch)
    check_kap_conversion(arch, "square", tmp_path)


class PermutingLayerNorm(torch.nn.LayerNorm):
    """A user's LayerNorm over NCHW channels: a subclass of nn.LayerNorm with its own (permuting) forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _permuting_norm_net(channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, channels, 3, padding=1), PermutingLayerNorm(channels), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 5),
    ).double().eval()  # fmt: skip


def test_a_layernorm_subclass_with_its_own_forward_keeps_its_width():
    """Its normalized shape (3) is not the size of the dim nn.LayerNorm normalises (W = 16): kapify keeps the group."""
    model = _permuting_norm_net(3)
    wide = kapify.rewiden(model, "square", function_preserving=True, example_input=X)
    assert wide[0].out_channels == 3
    torch.testing.assert_close(wide(X), model(X), rtol=1e-9, atol=1e-9)


@pytest.mark.xfail(strict=True, raises=RewidenError, reason="open: its normalized shape equals W, so kapify reads "
                   "it as a LayerNorm over W; the self-check catches the broken forward")  # fmt: skip
def test_a_layernorm_subclass_whose_width_equals_the_image_width():
    model = _permuting_norm_net(15)  # 15 channels on 16 x 16 images: widened to 16, the same as W
    X15 = torch.rand(2, 3, 15, 15, dtype=torch.float64)
    kapify.rewiden(model, "square", function_preserving=True, example_input=X15)
