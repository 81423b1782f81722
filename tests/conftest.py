import os
import tempfile

import pytest
import torch

# decoded-dataset cache of this test session only (inherited by subprocesses): tests never read a user's cache
os.environ["KAPIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="kapify-test-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


SHARED_DATA = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def cifar_dir():
    """The shared CIFAR-10 JPEG copy (../shared/data); tests that need real images skip without it."""
    if not (SHARED_DATA / "cifar10-jpeg" / "test.tar.gz").is_file():
        pytest.skip(f"the CIFAR-10 JPEG copy is not at {SHARED_DATA}/cifar10-jpeg")
    return str(SHARED_DATA)
