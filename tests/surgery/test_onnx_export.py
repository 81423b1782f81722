"""A folded model exports to ONNX and runs there with the same outputs (onnxruntime)."""

import numpy as np
import pytest
import timm
import torch
import torchvision

import kapify

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize(
    "build",
    [
        lambda: timm.create_model("resnet18", num_classes=10),  # every pool folded into conv weights
        lambda: torchvision.models.mobilenet_v2(num_classes=10),  # depthwise pools stay activation ops
    ],
    ids=["resnet18-folded", "mobilenet_v2-depthwise-activation-pools"],
)
def test_folded_model_exports_to_onnx_with_equal_outputs(build, tmp_path):
    x = torch.rand(2, 3, 32, 32)
    folded = kapify.fold(kapify.convert(build(), example_input=x[:1])).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(folded, (x,), dynamo=True).save(str(path))
    onnx.checker.check_model(onnx.load(str(path)))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = folded(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
