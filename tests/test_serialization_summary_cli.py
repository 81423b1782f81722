import json

import pytest
import torch
import torchvision

import kapify
from kapify.cli import main


@pytest.mark.parametrize("name", ["timm/resnet18", "torchvision/mobilenet_v2"])
def test_save_load_round_trip(tmp_path, name):
    model = kapify.create_model(name, num_classes=10)
    kap = kapify.convert(model, k=3, sigma=0.1, pool="max", exclude="*classifier*")
    with torch.no_grad():
        for p in kap.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # weights that differ from a fresh init
    path = tmp_path / "kap.safetensors"
    kapify.save(kap, path, extra={"epochs": 3})
    back = kapify.load(path)
    assert type(back) is type(kap)
    assert kapify.get_config(back).to_dict() == kapify.get_config(kap).to_dict()
    assert kapify.load_extra(path) == {"epochs": 3}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), kap.eval()(x))


def test_save_plain_timm_model_infers_source(tmp_path):
    import timm

    kap = kapify.convert(timm.create_model("resnet18", pretrained=False, num_classes=7))
    assert kapify.get_config(kap).source == {"library": "timm", "name": "resnet18",
                                             "kwargs": {"num_classes": 7, "in_chans": 3}}
    kapify.save(kap, tmp_path / "m.safetensors")
    assert kapify.load(tmp_path / "m.safetensors").num_classes == 7


def test_save_load_errors(tmp_path):
    kap = kapify.convert(torchvision.models.resnet18(weights=None))
    with pytest.raises(ValueError, match="kapify.create_model\\('torchvision/"):
        kapify.save(kap, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="not converted"):
        kapify.save(torchvision.models.resnet18(weights=None), tmp_path / "y.safetensors")
    with pytest.raises(FileNotFoundError, match="no kapify checkpoint"):
        kapify.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        kapify.load(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a kapify checkpoint"):
        kapify.load(tmp_path / "plain.safetensors")


def test_summary_text_and_data():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3), torch.nn.ReLU(), torch.nn.Conv2d(7, 64, 1))
    s = kapify.summary(kapify.convert(conv, grid="rect", example_input=torch.randn(1, 3, 8, 8)))
    assert [r["grid"] for r in s.rows] == ["1x7", "8x8"]
    assert s.elongated == ["0"]
    text = str(s)
    assert "1x7 (elongated)" in text and "8x8" in text and "parameters: 708 before, 708 after" in text
    data = s.to_dict()
    assert data["params_before"] == data["params_after"] == 3 * 7 * 9 + 7 + 7 * 64 + 64 and len(data["layers"]) == 2
    json.dumps(data)
    with pytest.raises(ValueError, match="not converted"):
        kapify.summary(conv)


def test_cli_convert(tmp_path, capsys):
    out = tmp_path / "s.json"
    ckpt = tmp_path / "m.safetensors"
    assert main(["convert", "resnet18", "--num-classes", "10", "--json", str(out), "--save", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "layer4.1.conv2" in text and "24x24" in text and "output (2, 10)" in text  # square default: 512 -> 576
    assert json.loads(out.read_text())["layers"][0]["name"] == "conv1"
    assert kapify.load(ckpt).num_classes == 10
    assert main(["convert", "resnet18", "--k", "4"]) == 2
    assert "odd" in capsys.readouterr().err
