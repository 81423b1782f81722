"""Input stages (pixel noise, normalisation) run at every entry point of a converted model, once."""

import copy

import pytest
import timm
import torch
from timm.models import create_feature_extractor
from torch import nn

import kapify
from kapify.layers.input_stage import input_stages
from kapify.models import adapt


def _calls(module: nn.Module) -> list:
    calls: list = []
    module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))  # returns None: output unchanged
    return calls


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto"])
def test_input_noise_reaches_every_entry_point_once(name):
    x = torch.rand(2, 3, 64, 64)
    kap = kapify.convert(timm.create_model(name, pretrained=False, num_classes=10), sigma=0.1, example_input=x).train()
    calls = _calls(kap.kapify_input_noise)
    kap(x)
    assert len(calls) == 1  # once per call, not once on the model and once on its stem
    kap.forward_features(x)
    assert len(calls) == 2
    kap.forward_intermediates(x)
    assert len(calls) == 3
    extractor = create_feature_extractor(kap, return_nodes={kap.feature_info[-1]["module"]: "out"})
    extractor(x)
    assert len(calls) == 4  # timm's FX feature extractor too
    kap.eval()
    torch.testing.assert_close(kap.forward_features(x), kap.forward_features(x))  # eval: no noise anywhere


def test_noise_runs_before_normalisation_on_the_entry_module_and_survives_copies(tmp_path):
    model = adapt(
        kapify.create_model("timm/resnet18", num_classes=10), "normalize_input", mean=[0.5] * 3, std=[0.25] * 3
    )
    x = torch.rand(2, 3, 32, 32)
    kap = kapify.convert(model, sigma=0.1, example_input=x)
    assert input_stages(kap) == [kap.kapify_input_noise, kap.kapify_normalize]
    assert not kap._forward_pre_hooks and len(kap.conv1._forward_pre_hooks) == 2  # moved to the stem conv
    twin = copy.deepcopy(kap)
    assert input_stages(twin)[0] is twin.kapify_input_noise is not kap.kapify_input_noise
    kapify.save(kap, tmp_path / "m.safetensors")
    back = kapify.load(tmp_path / "m.safetensors").eval()
    torch.testing.assert_close(back.forward_features(x), kap.eval().forward_features(x))
    folded = kapify.fold(kap)
    assert input_stages(folded) == [folded.kapify_normalize] and not hasattr(folded, "kapify_input_noise")


class TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_input_read_by_two_modules_keeps_the_stage_on_the_model():
    kap = kapify.convert(TwoReaders(), k=1, sigma=0.1, grid="rect", example_input=torch.rand(1, 3, 4, 4)).train()
    assert len(kap._forward_pre_hooks) == 1 and not kap.a._forward_pre_hooks and not kap.b._forward_pre_hooks
    calls = _calls(kap.kapify_input_noise)
    kap(torch.rand(1, 3, 4, 4))
    assert len(calls) == 1  # one draw shared by both readers
