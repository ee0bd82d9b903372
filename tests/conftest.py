"""Shared fixtures: a tiny embedded dataset and trained smoke checkpoints, built once per session."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# ----------------------------------------------------------------------------------------------
# Helpers of the stage-two CLI tests (imported as `from conftest import ...`)

CADENCE = ["--steps", 6, "--log-every", 2, "--val-every", 3, "--ckpt-every", 3]  # pinned: the tests count on it
TILE = 32 + 2  # a 32x32 slice plus util.image_grid's 2px padding


def run_user_cli(*argv):
    """Run a command as a user would (one thread per process); returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *[str(a) for a in argv]], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def assert_one_line_errors(script, cases):
    """Each (argv, message): `python script *argv` exits 1 with one 'error:' line holding message, no traceback."""
    for argv, message in cases:
        proc = run_user_cli(script, *argv)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr


def ddp_smoke_train(script, ae, out, kind):
    """`torchrun --nproc_per_node=2 script train` (gloo, smoke preset, CADENCE) that must finish on rank 0
    alone at step 6; returns the run's log records."""
    import util

    proc = run_user_cli("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        script, "train", "--ae", ae, "--preset", "smoke", "--out", out, "--device", "cpu", *CADENCE)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distributed: 2 processes, backend gloo" in proc.stdout and proc.stdout.count("done:") == 1
    assert util.load_checkpoint(out / "last.pt", kind=kind)["step"] == 6
    return util.read_jsonl(out / "log.jsonl")


def free_port():
    """A free TCP port on localhost for a torchrun rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grid_size(rows, cols):
    """(width, height) of util.image_grid for rows x cols 32x32 tiles."""
    return cols * TILE + 2, rows * TILE + 2


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and leaves the other core alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
