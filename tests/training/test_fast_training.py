"""Issue 12's fast path: dataset cache, tensor loader, precision auto-detection, noise layout, bf16 CPU training."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kapify import precision as precision_mod
from kapify.data import build_dataset
from kapify.data.cache import cached_decode
from kapify.data.datasets import _read_jpeg_archive
from kapify.data.tensor_loader import TensorLoader, random_crop_flip, tensor_arrays
from kapify.files import cache_dir
from kapify.layers.noise import GaussianNoise, gaussian_like
from kapify.precision import resolve_precision
from kapify.training import parse_args, train


def _crop_flip_reference(images, offsets, flips, padding):
    out = torch.empty_like(images)
    n, c, h, w = images.shape
    padded = torch.zeros(n, c, h + 2 * padding, w + 2 * padding, dtype=images.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = images
    for i in range(n):
        for r in range(h):
            for q in range(w):
                src = w - 1 - q if flips[i] else q
                out[i, :, r, q] = padded[i, :, offsets[i, 0] + r, offsets[i, 1] + src]
    return out


@pytest.mark.parametrize("shape,padding", [((5, 3, 8, 8), 2), ((4, 1, 7, 5), 3), ((3, 2, 6, 9), 0)])
def test_random_crop_flip_matches_a_loop(shape, padding):
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * padding + 1, (shape[0], 2))
    flips = torch.rand(shape[0]) < 0.5
    assert torch.equal(
        random_crop_flip(images, offsets, flips, padding), _crop_flip_reference(images, offsets, flips, padding)
    )


def _loader(n=40, **kwargs):
    images = torch.randint(0, 256, (n, 6, 6, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return TensorLoader(images, torch.arange(n), **{"batch_size": 8, "train": True, "seed": 1, "padding": 2, **kwargs})


def test_tensor_loader_epoch_is_a_function_of_seed_and_epoch_and_can_skip():
    a, b = _loader(), _loader()
    a.sampler.set_epoch(2)
    b.sampler.set_epoch(2)
    batches = list(a)
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(batches, b))
    torch.manual_seed(123)  # the global RNG plays no part
    b.sampler.set_epoch(2)
    b.sampler.skip_batches(3)
    assert len(b) == len(batches) - 3
    x, y = next(iter(b))
    assert torch.equal(x, batches[3][0]) and torch.equal(y, batches[3][1])
    b.sampler.set_epoch(3)
    assert not torch.equal(next(iter(b))[1], batches[0][1])
    assert batches[0][0].dtype == torch.float32 and 0 <= batches[0][0].min() and batches[0][0].max() <= 1


def test_tensor_loader_covers_each_image_once_and_shards_disjointly():
    whole = torch.cat([y for _, y in _loader(train=True, batch_size=5)])
    assert sorted(whole.tolist()) == list(range(40))
    shards = [torch.cat([y for _, y in _loader(rank=r, world_size=2, batch_size=4)]) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 20 and not set(shards[0].tolist()) & set(shards[1].tolist())
    evaluation = _loader(train=False, batch_size=16)
    x, y = next(iter(evaluation))
    assert len(evaluation) == 3 and torch.equal(y, torch.arange(16))
    assert torch.equal(x, evaluation.images[:16].float() / 255)  # no augmentation when evaluating


def test_tensor_loader_refuses_float_images():
    with pytest.raises(ValueError, match="uint8"):
        TensorLoader(torch.rand(4, 3, 8, 8), [0, 1, 2, 3], batch_size=2, train=True)


def test_cached_dataset_equals_the_jpeg_decode_exactly(cifar_dir):
    archive = Path(cifar_dir) / "cifar10-jpeg" / "test.tar.gz"
    images, labels, classes = _read_jpeg_archive(archive, "test")
    first = build_dataset(
        "cifar10", train=False, data_dir=cifar_dir, download=False
    )  # decodes, or reads this session's cache
    second = build_dataset("cifar10", train=False, data_dir=cifar_dir, download=False)  # reads the cache
    for ds in (first, second):
        assert np.array_equal(ds.images, images) and ds.targets == labels and ds.classes == classes
    cached, cached_labels = tensor_arrays(second)
    assert torch.equal(cached, torch.from_numpy(images)) and cached_labels.tolist() == labels


def _small_source(tmp_path, value=7):
    src = tmp_path / "source.bin"
    src.write_bytes(bytes([value]) * 10)
    calls = []

    def decode():
        calls.append(1)
        return np.full((3, 4, 4, 3), value, dtype=np.uint8), [0, 1, 2], ["a", "b", "c"]

    return src, decode, calls


def test_corrupt_or_altered_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPIFY_CACHE_DIR", str(tmp_path / "cache"))
    src, decode, calls = _small_source(tmp_path)
    cached_decode("toy", "train", [src], decode)
    cached_decode("toy", "train", [src], decode)
    assert len(calls) == 1  # second call read the cache
    (path,) = list(cache_dir().glob("toy-train-*.pt"))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    with pytest.warns(UserWarning, match="corrupt dataset cache"):
        images, labels, _ = cached_decode("toy", "train", [src], decode)
    assert len(calls) == 2 and int(images[0, 0, 0, 0]) == 7 and labels == [0, 1, 2]
    blob = torch.load(path, weights_only=True)
    blob["images"][0, 0, 0, 0] = 99  # altered contents, stale checksum
    torch.save(blob, path)
    with pytest.warns(UserWarning, match="do not match their checksum"):
        images, _, _ = cached_decode("toy", "train", [src], decode)
    assert len(calls) == 3 and int(images[0, 0, 0, 0]) == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_decode("toy", "train", [src], decode)  # rebuilt file is good again
    assert len(calls) == 3


def test_a_changed_source_gets_a_new_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KAPIFY_CACHE_DIR", str(tmp_path / "cache"))
    src, decode, calls = _small_source(tmp_path)
    cached_decode("toy", "test", [src], decode)
    src.write_bytes(b"changed")
    cached_decode("toy", "test", [src], decode)
    assert len(calls) == 2 and len(list(cache_dir().glob("toy-test-*.pt"))) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_noise_is_iid_normal_in_the_input_layout(dtype, layout):
    x = torch.zeros(16, 32, 24, 24, dtype=dtype).contiguous(memory_format=layout)
    noise = gaussian_like(x, 0.5)
    assert noise.shape == x.shape and noise.dtype == dtype and noise.is_contiguous(memory_format=layout)
    flat = noise.float().flatten()
    assert abs(flat.mean().item()) < 0.01 and abs(flat.std().item() - 0.5) < 0.01
    # no structure along channels or pixels: neighbours are uncorrelated
    n = noise.float()
    for a, b in ((n[:, 1:], n[:, :-1]), (n[..., 1:], n[..., :-1])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.01
    assert not torch.equal(noise, gaussian_like(x, 0.5))  # a new draw each call
    layer = GaussianNoise(0.5).train()
    assert layer(x).is_contiguous(memory_format=layout)


def test_precision_auto_follows_the_device(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", None, cuda) == precision_mod.Precision("bf16", True)
    precision_mod.cpu_has_fast_bf16.cache_clear()
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", None, cpu) == precision_mod.Precision("bf16", True)
    monkeypatch.setattr(precision_mod, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", None, cpu) == precision_mod.Precision("none", False)
    assert resolve_precision("bf16", False, cpu).describe() == "bf16, contiguous"
    with pytest.raises(ValueError, match="amp must be"):
        resolve_precision("fp8", None, cpu)


def test_boolean_options_are_flags():
    assert parse_args(["--download"]).download is True
    assert parse_args(["--no-download"]).download is False
    assert parse_args(["--download", "false"]).download is False
    assert parse_args(["--no-channels-last"]).channels_last is False and parse_args([]).channels_last is None
    with pytest.raises(SystemExit):
        parse_args(["--download", "--no-download"])


def test_bf16_channels_last_training_on_cpu_records_what_ran(cifar_dir, tmp_path):
    import csv

    metrics = train(
        parse_args(
            [
                "--model",
                "kapify/small_convnet",
                "--model-kwargs",
                "{depth: 2, width: 16}",
                "--data-dir",
                cifar_dir,
                "--no-download",
                "--train-samples",
                "128",
                "--val-samples",
                "32",
                "--test-samples",
                "32",
                "--batch-size",
                "32",
                "--epochs",
                "1",
                "--amp",
                "bf16",
                "--channels-last",
                "--output",
                str(tmp_path),
                "--experiment",
                "bf16",
            ]
        )
    )
    assert metrics["finished"] and metrics["precision"] == "bf16, channels_last" and metrics["loader"] == "tensor"
    row = next(csv.DictReader(open(tmp_path / "bf16" / "log.csv")))
    assert (row["precision"], row["memory_format"]) == ("bf16", "channels_last") and float(row["train_loss"]) > 0
