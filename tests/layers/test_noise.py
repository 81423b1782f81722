import pytest
import torch
from torch import nn

from kapify.layers import GaussianNoise, set_noise


def test_training_adds_noise_of_given_std():
    noise = GaussianNoise(0.3).train()
    x = torch.zeros(200_000)
    y = noise(x)
    assert abs(y.std().item() - 0.3) < 0.01 and abs(y.mean().item()) < 0.01


def test_eval_is_identity_and_test_time_switch():
    model = nn.Sequential(GaussianNoise(0.2, site="input"), nn.Identity(), GaussianNoise(0.2)).eval()
    x = torch.randn(4, 8)
    assert torch.equal(model(x), x)
    assert set_noise(model, True, site="activation") == 1
    assert model[0].test_time is False and model[2].test_time is True
    assert not torch.equal(model(x), x)
    assert set_noise(model, True, sigma=0.5) == 2 and model[0].sigma == 0.5
    set_noise(model, False)
    assert torch.equal(model(x), x)


def test_zero_sigma_is_identity_in_training():
    x = torch.randn(3, 3)
    assert torch.equal(GaussianNoise(0.0).train()(x), x)


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), float("inf"), "a"])
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(sigma)


def test_bad_site():
    with pytest.raises(ValueError, match="site"):
        set_noise(nn.Sequential(), True, site="hidden")
