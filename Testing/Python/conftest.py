"""Shared fixtures: a small phantom data set made once per session, tiny network settings."""
from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a shared, busy CPU spinning made torch's
# 2-thread ops 7x (conv) to 100x (elementwise) slower. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`make test`: one worker per core) each worker takes one thread.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))

# The slowest test files, longest first (about 400 s for test_denoise.py and 350 s for test_demo.py under
# `make test` on 2 cores, 2026-12-03; the quick anomaly and segment studies about 170 s each; then the
# quick generate and translate studies, 90 and 70 s with one thread). `make test` runs them first (with
# --no-loadscope-reorder: xdist's own order, by test count, left the slow files with few tests for last
# and one worker idle at the end); the other files follow in collection order.
SLOWEST_FIRST = ("test_denoise.py", "test_demo.py", "test_study_anomaly.py", "test_study_segment.py",
                 "test_study_generate.py", "test_study_translate.py", "test_study.py", "test_anomaly.py",
                 "test_generate_labels.py", "test_slicer_logic.py", "test_segment.py", "test_generate.py",
                 "test_translate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order test files slowest first (stable: a file's own tests keep their order)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# A network small enough to train for a minute on two CPU cores (channels divisible by groups).
TINY_NETWORK = {"channels": [32, 64], "attention_levels": [False, False], "norm_num_groups": 16,
                "num_res_blocks": 1}


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Three 2 mm phantom subjects (seed 0) in nnU-Net v2 layout."""
    from DiffusionMICLib.phantom import write_phantom
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, subjects=3, seed=0, resolution=2.0, noise=5.0, lesions=3)
    return out


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory) -> Path:
    """One held-out 2 mm subject from a seed the training set never uses."""
    from DiffusionMICLib.phantom import write_phantom
    out = tmp_path_factory.mktemp("heldout")
    write_phantom(out, subjects=1, seed=1234, resolution=2.0, noise=5.0, lesions=3)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared, busy 2-core machine two threads ran its
    CPU trainings about 4x slower than one (measured); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_settings() -> dict:
    return {"network": dict(TINY_NETWORK), "patch": [48, 48],
            "train": {"batch_size": 8, "ema_start": 20, "checkpoint_every": 50}}


def perturb(network: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """MONAI zero-initialises the output conv; give an untrained net non-zero outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return network
