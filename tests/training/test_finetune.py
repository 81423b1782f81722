"""Starting from a trained model: KAP warm-start blend, --initial-checkpoint, --arrange (issue 15)."""

import csv

import pytest
import torch
from torch import nn

import kapify
from kapify.data import dataset_info
from kapify.training import build_model, parse_args, train

TINY = [
    "--model",
    "kapify/small_convnet",
    "--model-kwargs",
    "{depth: 2, width: 16}",
    "--no-download",
    "--val-samples",
    "32",
    "--test-samples",
    "32",
    "--batch-size",
    "32",
    "--workers",
    "0",
    "--grid",
    "rect",
]


@pytest.mark.parametrize("impl", ["weight", "activation"])
def test_blend_zero_is_the_plain_model_and_one_is_kap(impl):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 9, 1)).double().eval()
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    kap = kapify.convert(plain, sigma=0.0, grid="rect", impl=impl).eval()
    warm = kapify.convert(plain, sigma=0.0, grid="rect", impl=impl, blend=0.0).eval()
    with torch.no_grad():
        assert torch.allclose(warm(x), plain(x), rtol=0, atol=1e-12)
        assert kapify.set_blend(warm, 0.25) == 2
        quarter = warm(x)
        kapify.set_blend(warm, 1.0)
        assert torch.allclose(warm(x), kap(x), rtol=0, atol=1e-12)
        assert torch.allclose(
            kapify.fold(kapify.convert(plain, sigma=0.0, grid="rect", impl=impl, blend=0.25))(x), quarter, atol=1e-12
        )
    assert kapify.get_config(warm).blend == 1.0
    with pytest.raises(ValueError, match="blend must be in"):
        kapify.set_blend(warm, 1.5)
    with pytest.raises(ValueError, match="average pooling with stride 1"):
        kapify.convert(plain, pool="max", blend=0.0)


def test_blend_schedule_resumes_bit_identically(cifar_dir, tmp_path):
    args = TINY + [
        "--data-dir",
        cifar_dir,
        "--train-samples",
        "320",
        "--epochs",
        "2",
        "--sigma",
        "0.1",
        "--kap-warmup-epochs",
        "1.5",
        "--output",
        str(tmp_path),
    ]
    straight = train(parse_args(args + ["--experiment", "straight"]))
    assert not train(parse_args(args + ["--experiment", "cut", "--max-steps", "7"]))["finished"]
    resumed = train(parse_args(args + ["--experiment", "cut"]))
    assert resumed["finished"] and straight["steps"] == resumed["steps"] == 20
    a = kapify.load(tmp_path / "straight" / "model.safetensors").state_dict()
    b = kapify.load(tmp_path / "cut" / "model.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    blends = [float(r["kap_blend"]) for r in csv.DictReader(open(tmp_path / "straight" / "log.csv"))]
    assert blends == [pytest.approx(10 / 15), 1.0]
    assert kapify.load_config(tmp_path / "straight" / "model.safetensors").blend == 1.0


def test_initial_checkpoint_takes_both_kinds_of_file_and_refuses_a_misfit(cifar_dir, tmp_path):
    info = dataset_info("cifar10")
    train(
        parse_args(
            TINY
            + [
                "--data-dir",
                cifar_dir,
                "--train-samples",
                "64",
                "--epochs",
                "1",
                "--pool",
                "none",
                "--sigma",
                "0",
                "--output",
                str(tmp_path),
                "--experiment",
                "nt",
            ]
        )
    )
    trained = kapify.load(tmp_path / "nt" / "model.safetensors").state_dict()
    plain_file = tmp_path / "plain.pth"
    torch.save({"state_dict": trained}, plain_file)
    for source in (tmp_path / "nt" / "model.safetensors", plain_file):
        cfg = parse_args(TINY + ["--initial-checkpoint", str(source), "--kap-warmup-epochs", "1", "--sigma", "0"])
        model = build_model(cfg, info).eval()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
        x = torch.rand(2, 3, 32, 32)
        reference = kapify.load(tmp_path / "nt" / "model.safetensors").eval()
        with torch.no_grad():
            assert torch.allclose(model(x), reference(x), atol=1e-5)  # blend 0: the trained function
    wide = parse_args(
        TINY[:2] + ["--model-kwargs", "{depth: 2, width: 25}"] + TINY[4:] + ["--initial-checkpoint", str(plain_file)]
    )
    with pytest.raises(ValueError, match="does not fit the model.*shape mismatch"):
        build_model(wide, info)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_model(parse_args(TINY + ["--initial-checkpoint", str(tmp_path / "none.pth")]), info)


def test_arrange_option_keeps_the_trained_function_before_pooling(cifar_dir, tmp_path):
    info = dataset_info("cifar10")
    train(
        parse_args(
            TINY
            + [
                "--data-dir",
                cifar_dir,
                "--train-samples",
                "64",
                "--epochs",
                "1",
                "--pool",
                "none",
                "--sigma",
                "0",
                "--output",
                str(tmp_path),
                "--experiment",
                "nt",
            ]
        )
    )
    ckpt = str(tmp_path / "nt" / "model.safetensors")
    arranged = build_model(
        parse_args(
            TINY + ["--initial-checkpoint", ckpt, "--arrange", "similarity", "--kap-warmup-epochs", "1", "--sigma", "0"]
        ),
        info,
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(arranged(x), kapify.load(ckpt).eval()(x), atol=1e-5)
