import os
import tempfile

import pytest
import torch

# decoded-dataset cache of this test session only (inherited by subprocesses): tests never read a user's cache
os.environ["KAPIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="kapify-test-cache-")

from kapify.surgery.conv_types import is_conv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def state_snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed conversion must leave unchanged: tensors, module classes, train flags."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "classes": [(n, type(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "hooks": len(model._forward_pre_hooks),
    }


def assert_unchanged(model: torch.nn.Module, snapshot: dict) -> None:
    now = state_snapshot(model)
    assert now["classes"] == snapshot["classes"] and now["training"] == snapshot["training"]
    assert now["hooks"] == snapshot["hooks"] and now["tensors"].keys() == snapshot["tensors"].keys()
    assert all(torch.equal(now["tensors"][k], v) for k, v in snapshot["tensors"].items())
    assert not hasattr(model, "kapify_config")


def called_convs(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """name -> (input, output) of every conv module an eager forward calls."""
    seen, handles = {}, []

    def record(name):
        def hook(module, inputs, output):
            if name not in seen:  # clone: later in-place ops (ReLU(inplace=True)) would change them
                seen[name] = (tuple(t.clone() for t in inputs), output.clone())

        return hook

    for name, module in model.named_modules():
        if is_conv(module):
            handles.append(module.register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def cifar_dir():
    """The shared CIFAR-10 JPEG copy (../shared/data); tests that need real images skip without it."""
    if not (SHARED_DATA / "cifar10-jpeg" / "test.tar.gz").is_file():
        pytest.skip(f"the CIFAR-10 JPEG copy is not at {SHARED_DATA}/cifar10-jpeg")
    return str(SHARED_DATA)


def free_port() -> int:
    """A TCP port nobody listens on, for torchrun's rendezvous in tests."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
