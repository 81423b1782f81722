"""Compiled training: converted models trace into one torch.compile graph with the noise drawn inside
it, and the recipes' --compile option resolves and runs."""

import json

import pytest
import timm
import torch
import torch._dynamo

import kapify
from kapify.models import small_image_stem
from kapify.training import compiling, parse_args, train
from kapify.training.compiling import resolve_compile

CASES = {
    "rect": dict(grid="rect", sigma=0.1),
    "square": dict(grid="square", sigma=0.1),
    "kmp": dict(pool="max", grid="square", sigma=0.1),
    "blend": dict(grid="square", sigma=0.1, blend=0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_converted_resnet18_compiles_in_one_graph_with_its_noise(case):
    options = dict(CASES[case])
    blend = options.pop("blend", None)
    model = kapify.convert(
        small_image_stem(timm.create_model("resnet18", num_classes=10)),
        k=3,
        example_input=torch.randn(1, 3, 32, 32),
        **options,
    ).train()
    if blend is not None:
        kapify.set_blend(model, blend)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(4, 3, 32, 32))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    code = explained.graphs[0].code
    convs = sum(1 for m in model.modules() if kapify.surgery.is_kap_conv(m))
    assert code.count("normal") >= convs  # one draw per conv (and the input's), inside the graph
    torch._dynamo.reset()


def test_resolve_compile(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu) is None and resolve_compile("auto", cuda) is None  # until checked on a GPU
    monkeypatch.setattr(compiling, "CUDA_COMPILE_CHECKED", True)
    assert resolve_compile("auto", cuda) == "reduce-overhead" and resolve_compile("auto", cpu) is None
    assert resolve_compile("auto", cuda, "pgd_at") is None and resolve_compile("default", cuda, "trades") == "default"
    assert resolve_compile("off", cuda) is None and resolve_compile(False, cuda) is None
    assert resolve_compile(True, cpu) == "default" and resolve_compile("max-autotune", cpu) == "max-autotune"
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_compile("fast", cpu)


def test_bad_compile_mode_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--compile", "fast"])
    cfg = parse_args(["--model", "kapify/small_convnet", "--output", str(tmp_path)])
    cfg.compile = "fast"  # e.g. from a YAML file
    with pytest.raises(ValueError, match="compile must be one of"):
        train(cfg)


@pytest.mark.slow
def test_compiled_training_runs_and_records_its_mode(tmp_path, cifar_dir):
    cfg = parse_args(
        [
            "--model",
            "kapify/small_convnet",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(cifar_dir),
            "--no-download",
            "--output",
            str(tmp_path),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--train-samples",
            "64",
            "--val-samples",
            "0",
            "--test-samples",
            "32",
            "--compile",
            "default",
            "--amp",
            "none",
            "--workers",
            "0",
        ]
    )
    metrics = train(cfg)
    assert metrics["compile"] == "default" and metrics["first_update_s"] > 0
    assert json.loads((tmp_path / cfg.run_name() / "metrics.json").read_text())["compile"] == "default"
    assert 0 <= metrics["test_acc"] <= 1
