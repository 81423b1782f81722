"""kapify.arrange_channels: permuting coupled channels keeps the plain model's function and puts similar filters side
by side."""

import pytest
import timm
import torch
import torchvision

import kapify
from kapify.layers import ChannelGrid
from kapify.surgery.arrange import grid_placement, neighbour_similarity


@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),  # residual adds
        lambda: torchvision.models.densenet121(num_classes=10),  # concats
        pytest.param(lambda: torchvision.models.resnext50_32x4d(num_classes=10), marks=pytest.mark.slow),  # grouped
        lambda: timm.create_model("seresnet18", pretrained=False, num_classes=10),  # squeeze-excitation multiplies
    ],
    ids=["resnet18", "densenet121", "resnext50", "seresnet18"],
)
def test_arranged_model_computes_what_the_original_did(build):
    torch.manual_seed(0)
    model = build().double().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so a wrong permutation would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    arranged, report = kapify.arrange_channels(model, example_input=x)
    moved = [r for r in report if r.skipped is None]
    assert moved and all(r.after >= r.before - 1e-9 for r in moved)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), arranged.state_dict().values()))
    with torch.no_grad():
        assert torch.allclose(arranged(x), model(x), rtol=1e-10, atol=1e-12)
    assert all(
        r.skipped for r in report if r.producers[-1] in ("fc", "classifier", "head.fc")
    )  # logits keep their order


def test_placement_recovers_a_hidden_two_dimensional_layout():
    torch.manual_seed(0)
    grid = ChannelGrid(6, 6)
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    points = torch.stack([rows.flatten(), cols.flatten()], 1)
    sim = torch.exp(-(torch.cdist(points, points) ** 2))  # similar = close on a hidden 6x6 sheet
    shuffle = torch.randperm(36)
    sim = sim[shuffle][:, shuffle]
    scrambled = neighbour_similarity(sim, torch.arange(36), grid)
    placed = neighbour_similarity(sim, grid_placement(sim, grid), grid)
    best = neighbour_similarity(sim[torch.argsort(shuffle)][:, torch.argsort(shuffle)], torch.arange(36), grid)
    assert placed > scrambled + 0.2 and placed >= 0.8 * best  # measured: 0.31 of the best 0.37, from 0.05 scrambled


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown arrange method"):
        kapify.arrange_channels(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1)), method="random")


def test_convert_with_arrange_reports_neighbour_similarity_and_saves():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    kap = kapify.convert(model, sigma=0.0, grid="rect", arrange="similarity", blend=0.0, example_input=x).eval()
    with torch.no_grad():
        assert torch.allclose(kap(x), model(x), atol=1e-5)  # arranged + blend 0: the original function
    rows = kapify.summary(kap).rows
    assert all(r["neighbour_similarity"][1] >= r["neighbour_similarity"][0] for r in rows if r["neighbour_similarity"])
    assert "neighbour sim." in str(kapify.summary(kap)) and kapify.get_config(kap).arrange == "similarity"
    with pytest.raises(ValueError, match="unknown arrange method"):
        kapify.convert(model, arrange="alphabetical")
