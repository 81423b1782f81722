import os
import tempfile

import pytest
import torch


def _share_cores_among_workers() -> None:
    """Under pytest-xdist, each worker gets its share of the cores (and so do the subprocesses it starts):
    two workers with a thread per core each oversubscribe the CPU, and torch's spinning threads then
    make many tests 5-10x slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_cores_among_workers()

# decoded-dataset cache of this test session only (inherited by subprocesses): tests never read a user's cache
os.environ["KAPIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="kapify-test-cache-")


@pytest.fixture
def scoped_registries():
    """What the test registers (conv types, handlers, rules) is undone after it (kapify.extend.scoped)."""
    from kapify.extend import scoped

    with scoped():
        yield


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
