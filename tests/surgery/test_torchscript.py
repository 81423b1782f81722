"""torch.jit.script compiles converted models (timm's test-suite check): same outputs in eval,
noise in training, saved and loaded as TorchScript."""

import copy

import pytest
import torch

import kapify
from kapify.models import adapt
from tests.helpers import CASES, build


def _model(name: str) -> torch.nn.Module:
    library, _, short = name.rpartition("/")
    return build(library or "timm", short)


@pytest.mark.parametrize(
    "name,grid,pool,blend",
    [
        ("resnet18", "rect", "avg", 0.5),  # weight route, warm-start blend, pixel normalisation moved to conv1
        ("resnet18", "square", "max", 1.0),  # KMP, re-widened
        pytest.param("efficientnet_b0", "square", "avg", 1.0, marks=pytest.mark.slow),  # depthwise, SE
        pytest.param("torchvision/mobilenet_v2", "square", "avg", 1.0, marks=pytest.mark.slow),
    ],
)
def test_scripted_model_matches_eager(name, grid, pool, blend, tmp_path):
    model = adapt(_model(name), "normalize_input", mean=[0.5] * 3, std=[0.25] * 3)
    x = torch.rand(2, 3, 64, 64)
    kap = kapify.convert(
        model, k=3, sigma=0.1, pool=pool, grid=grid, example_input=x, blend=blend if pool == "avg" else 1.0
    )
    kap.train()(x)  # leaves the input stages in training mode: the script must follow the model's mode
    kap.eval()
    scripted = torch.jit.script(copy.deepcopy(kap))
    with torch.no_grad():
        expected = kap(x)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-4, atol=1e-5)
        torch.jit.save(scripted, tmp_path / "m.pt")
        torch.testing.assert_close(torch.jit.load(tmp_path / "m.pt")(x), expected, rtol=1e-4, atol=1e-5)
        scripted.train()  # last: training mode also updates BatchNorm statistics
        assert not torch.allclose(scripted(x), scripted(x))  # noise on in training


@pytest.mark.slow
@pytest.mark.parametrize("library,name", CASES, ids=[f"{lib}-{n}" for lib, n in CASES])
def test_every_zoo_model_scripts_after_conversion(library, name):
    """The models of kapify's zoo tests script, square-grid KAP with noise, outputs equal to eager."""
    x = torch.rand(2, 3, 64, 64)
    kap = kapify.convert(build(library, name).eval(), k=3, sigma=0.1, example_input=x[:1]).eval()
    scripted = torch.jit.script(copy.deepcopy(kap))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), kap(x), rtol=1e-4, atol=1e-5)


class _TwoBranchStem(torch.nn.Module):
    """Two convs read the input (RepVGG's stem): no single module can host the input stages."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


def test_model_that_hosts_its_input_stages_scripts(tmp_path):
    """The input noise and normalisation stay on the model's own call; the script runs them once, before
    both branches (the same noise for both), and follows the model's mode; the eager model is unchanged."""
    model = adapt(_TwoBranchStem(), "normalize_input", mean=[0.5] * 3, std=[0.25] * 3)
    kap = kapify.convert(model, k=3, sigma=0.1, grid="rect", example_input=torch.rand(1, 3, 8, 8))
    assert kap.__dict__.get("__prepare_scriptable__") is not None  # the model hosts the stages
    x = torch.rand(2, 3, 8, 8)
    kap.eval()
    scripted = torch.jit.script(copy.deepcopy(kap))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), kap(x))
        torch.jit.save(scripted, tmp_path / "m.pt")
        torch.testing.assert_close(torch.jit.load(tmp_path / "m.pt")(x), kap(x))
    scripted.train()
    assert not torch.allclose(scripted(x), scripted(x))


def test_stages_moved_to_the_entry_conv_leave_no_twin_on_the_model():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    kap = kapify.convert(net, k=3, sigma=0.1, grid="rect", example_input=torch.rand(1, 3, 8, 8))
    assert "__prepare_scriptable__" not in kap.__dict__  # the stages run on kap[0], a Kap conv with its own twin
    assert torch.jit.script(copy.deepcopy(kap).eval()).original_name == "Sequential"
