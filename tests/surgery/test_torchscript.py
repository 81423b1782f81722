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
