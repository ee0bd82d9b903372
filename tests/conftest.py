"""Shared fixtures: a tiny embedded dataset and trained smoke checkpoints, built once per session."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 32x32 embedded MNI pseudo-cohort of 6 subjects in the OASIS PNG layout."""
    import dataset

    out = tmp_path_factory.mktemp("data") / "embedded_32"
    dataset.build_demo(out, size=32, subjects=6, seed=0)
    return out


def _train_stage1(tmp_path_factory, tiny_data, model):
    import prestage_train

    out = tmp_path_factory.mktemp(f"stage1_{model}") / "run"
    prestage_train.main(["--model", model, "--preset", "smoke", "--data", str(tiny_data), "--out", str(out)])
    return out


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory, tiny_data):
    """A smoke-trained VAE run directory (best.pt, last.pt, log.jsonl)."""
    return _train_stage1(tmp_path_factory, tiny_data, "vae")


@pytest.fixture(scope="session")
def vqvae_run(tmp_path_factory, tiny_data):
    """A smoke-trained VQ-VAE run directory."""
    return _train_stage1(tmp_path_factory, tiny_data, "vqvae")


def pytest_configure(config):
    config.addinivalue_line("markers", "ddp: multi-process torchrun (gloo) runs; part of the default run, "
                                       "deselect with -m 'not ddp' when short of time")
