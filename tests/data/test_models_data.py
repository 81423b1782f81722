"""Model adaptations replayed from checkpoints, the §4.2 convnet, and the dataset finders."""

import pickle

import numpy as np
import pytest
import torch

import kapify
from kapify.data import build_dataset, build_loader, dataset_info
from kapify.models import SmallConvNet, adapt, normalize_input


@pytest.mark.parametrize("name", ["timm/resnet18", "torchvision/resnet18", "timm/resnet18d", "timm/convnext_atto"])
def test_small_image_stem_keeps_resolution_and_replays_from_checkpoint(name, tmp_path):
    model = adapt(kapify.create_model(name, num_classes=10), "small_image_stem")
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    if hasattr(model, "maxpool"):
        assert isinstance(model.maxpool, torch.nn.Identity)
    kap = kapify.convert(model, sigma=0.0, example_input=torch.rand(1, 3, 32, 32)).eval()
    kapify.save(kap, tmp_path / "m.safetensors")
    back = kapify.load(tmp_path / "m.safetensors").eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(back(x), kap(x))


def test_normalize_input_is_pixel_space_and_noise_comes_first():
    model = normalize_input(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Flatten()), [0.5] * 3, [0.25] * 3)
    x = torch.rand(1, 3, 2, 2)
    conv = model[0]
    torch.testing.assert_close(model(x), torch.nn.Flatten()(conv((x - 0.5) / 0.25)))
    assert "kapify_normalize.mean" not in model.state_dict()  # state_dict keys unchanged
    kap = kapify.convert(model, pool=None, sigma=0.5, example_input=x).train()
    seen = {}
    kap.kapify_normalize.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0]))
    torch.manual_seed(0)
    kap(x)
    assert not torch.equal(seen["in"], x)  # the normaliser saw the noisy pixels: noise is added before it
    with pytest.raises(ValueError, match="already normalises"):
        normalize_input(model, [0.5] * 3, [0.25] * 3)
    with pytest.raises(ValueError, match="std > 0"):
        normalize_input(torch.nn.Conv2d(3, 3, 1), [0.5] * 3, [0.0] * 3)


def test_unknown_adaptation_and_model_are_clear_errors():
    with pytest.raises(ValueError, match="unknown adaptation"):
        adapt(torch.nn.Conv2d(3, 3, 1), "nope")
    with pytest.raises(ValueError, match="kapify has no model"):
        kapify.create_model("kapify/nope")


@pytest.mark.parametrize("depth,width", [(1, 16), (2, [8, 12]), (3, 10)])
def test_small_convnet_shapes_and_kap(depth, width):
    net = SmallConvNet(depth=depth, width=width, num_classes=7)
    assert net(torch.rand(3, 3, 32, 32)).shape == (3, 7)
    kap = kapify.convert(net, sigma=0.1)
    assert len(kapify.get_config(kap).layers) == depth
    with pytest.raises(ValueError, match="one positive width per block"):
        SmallConvNet(depth=2, width=[4])


def test_small_convnet_pools_before_relu_and_computes_conv_bn_relu_pool():
    """The block's ReLU after the max-pool is the paper's conv -> BN -> ReLU -> pool: outputs and gradients."""
    torch.manual_seed(0)
    net = SmallConvNet(depth=2, width=[6, 5], num_classes=3).double().train()
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    x[:, :, :4] = 0.0  # constant patches tie in the max-pool, where the two orders could route gradients apart

    def reference(inp):
        for block in net.features:
            conv, bn, pool, _ = block
            inp = pool(torch.relu(bn(conv(inp))))
        return net.head(inp)

    got, want = net(x), reference(x)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.square().sum(), list(net.parameters()))
    ref_grads = torch.autograd.grad(want.square().sum(), list(net.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_cifar10_jpeg_archive_reads_standard_labels(cifar_dir):
    test = build_dataset("cifar10", train=False, data_dir=cifar_dir, download=False)
    assert len(test) == 10_000 and test.classes[0] == "airplane" and test.classes[-1] == "truck"
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert np.bincount(test.targets).tolist() == [1000] * 10
    subset = build_dataset("cifar10", train=False, data_dir=cifar_dir, download=False, num_samples=50, seed=1)
    assert len(subset) == 50


def _fake_cifar_batches(root, n=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_cifar10_torchvision_layout_is_used_first(tmp_path, monkeypatch):
    _fake_cifar_batches(tmp_path)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)  # fake files, real reader
    train = build_dataset("cifar10", train=True, data_dir=str(tmp_path), download=False)
    assert len(train) == 30 and train[0][0].shape == (3, 32, 32)
    loader = build_loader("cifar10", True, batch_size=4, data_dir=str(tmp_path), download=False)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4,)


def test_missing_data_offline_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPIFY_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        build_dataset("cifar10", train=True, download=False)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
        build_dataset("tinyimagenet", train=True)
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_info("mnist")


@pytest.mark.slow  # over 10 s on the 2-core machine: the full run (CI) only
def test_loader_order_is_a_function_of_seed_and_epoch_and_can_skip(cifar_dir):
    kwargs = dict(batch_size=8, data_dir=cifar_dir, download=False, num_samples=64, augment=False)
    a, b = build_loader("cifar10", True, **kwargs), build_loader("cifar10", True, **kwargs)
    a.sampler.set_epoch(3)
    b.sampler.set_epoch(3)
    batches = [y for _, y in a]
    assert all(torch.equal(y, z) for y, z in zip(batches, (y for _, y in b)))
    b.sampler.set_epoch(3)
    b.sampler.skip_batches(5)
    assert len(b) == len(batches) - 5 and torch.equal(next(iter(b))[1], batches[5])
