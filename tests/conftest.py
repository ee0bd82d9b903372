"""Shared fixtures: a tiny embedded dataset and trained smoke checkpoints, built once per session; the one
thread pinning of every test and child process; and the helpers the test modules share, as fixtures
(`cli`, `quick_eval`, `disc_slices`, `write_disc_dataset`, `playground_module`, `repo_root`)."""
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the one place: the repo's top-level modules import as `import dataset`, ...

# Tiny models: one thread is fastest and leaves the other core alone. The in-process pin (`one_thread`) and
# the environment of every child process (`UserCLI.env`) use this one number, so runs in a subprocess sum in
# the same order as in-process ones (test_reliability compares them bit for bit).
THREADS = 1
THREAD_ENV = {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}


def pytest_configure(config):
    config.addinivalue_line("markers", "ddp: multi-process torchrun (gloo) runs; part of the default run, "
                                       "deselect with -m 'not ddp' when short of time")
    config.addinivalue_line("markers", "full: one step of each trainer's full (256x256) preset; part of the default "
                                       "run, deselect with -m 'not full' when short of time")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test runs on THREADS torch threads, and every child process (scripts run through `cli`,
    torch.multiprocessing workers, torchrun ranks) inherits THREAD_ENV."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in THREAD_ENV.items():
            mp.setenv(name, value)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def repo_root():
    """The repository root (the folder of the top-level scripts)."""
    return ROOT


# ----------------------------------------------------------------------------------------------
# Tiny data and smoke runs


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


def _disc_slices(subjects, size=32, num_z=32, seed=0):
    """uint8 [S*num_z, 1, size, size] discs whose radius grows with z (subject-specific centre, gain, noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    images, zs, subj = [], [], []
    for s in range(subjects):
        cy, cx = size / 2 + rng.uniform(-1.5, 1.5, 2)
        gain = rng.uniform(0.6, 1.0)
        for z in range(num_z):
            r = size * (0.1 + 0.35 * z / (num_z - 1))
            img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, gain, 0.0)
            img = img + 0.05 * rng.standard_normal((size, size))
            images.append(np.clip(img, 0, 1) * 255)
            zs.append(z)
            subj.append(s)
    return torch.from_numpy(np.array(images, np.uint8))[:, None], torch.tensor(zs), subj


def _write_disc_dataset(root, size=32, subjects=(10, 4, 4)):
    """A tiny OASIS-layout dataset of disc slices (train, validate, test subjects never shared)."""
    import dataset

    root = Path(root)
    for k, (split, n) in enumerate(zip(dataset.SPLITS, subjects)):
        folder = root / f"keras_png_slices_{split}"
        folder.mkdir(parents=True)
        images, zs, subj = _disc_slices(n, size, seed=k)
        for img, z, s in zip(images, zs.tolist(), subj):
            Image.fromarray(img[0].numpy()).save(folder / f"case_{split}{s:03d}_slice_{z}.nii.png")
    return root


@pytest.fixture(scope="session")
def disc_slices():
    """disc_slices(subjects, size=32, num_z=32, seed=0) -> (uint8 images [S*num_z, 1, size, size], z, subject
    of each image): synthetic discs whose radius grows with z."""
    return _disc_slices


@pytest.fixture(scope="session")
def write_disc_dataset():
    """write_disc_dataset(root, size=32, subjects=(10, 4, 4)) -> root: disc_slices written in the OASIS layout."""
    return _write_disc_dataset


# ----------------------------------------------------------------------------------------------
# Evaluation without Inception and with a quickly trained z regressor


@pytest.fixture(scope="session")
def zreg_cache(tmp_path_factory, tiny_data):
    """A cache dir holding a z regressor for tiny_data at 32x32 (100 steps, not 800)."""
    import evaluation

    cache = tmp_path_factory.mktemp("zreg")
    evaluation.z_regressor_for(tiny_data, 32, cache_dir=cache, steps=100, verbose=False)
    return cache


@pytest.fixture(scope="module")
def quick_eval(zreg_cache):
    """evaluation with a z regressor cached in a temp dir (100 steps, not 800) and no Inception/torchvision."""
    import evaluation

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evaluation, "CACHE_DIR", zreg_cache)
        mp.setattr(evaluation, "inception_model", lambda: (None, "not loaded in tests"))
        yield zreg_cache


# ----------------------------------------------------------------------------------------------
# Scripts as a user runs them


class UserCLI:
    """Run the repo's scripts as a user would (from the repo root, THREADS threads per process), and check
    what a user sees. The `cli` fixture is the one instance."""

    root = ROOT
    # pinned stage-two training cadence: the tests count on it
    CADENCE = ["--steps", 6, "--log-every", 2, "--val-every", 3, "--ckpt-every", 3]
    TILE = 32 + 2  # a 32x32 slice plus util.image_grid's 2px padding

    @staticmethod
    def env():
        """The environment of a child process: this one's, threads pinned, output unbuffered."""
        return dict(os.environ, **THREAD_ENV, PYTHONUNBUFFERED="1")

    def run(self, *argv, timeout=300, **kwargs):
        """`python *argv` from the repo root, output captured; returns the CompletedProcess."""
        return subprocess.run([sys.executable, *map(str, argv)], cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, env=self.env(), **kwargs)

    def popen(self, *argv, **kwargs):
        """`python *argv` from the repo root, started and not waited for; returns the Popen."""
        return subprocess.Popen([sys.executable, *map(str, argv)], cwd=self.root, env=self.env(), **kwargs)

    @staticmethod
    def assert_one_line_error(proc, *needles):
        """Exit code 1, exactly one `error: ` line on stderr naming every needle, no traceback; returns it."""
        err = proc.stderr.strip()
        assert proc.returncode == 1, (proc.returncode, err[-2000:])
        assert proc.stderr.startswith("error: ") and err.count("\n") == 0, err[-2000:]
        assert "Traceback" not in proc.stderr, err[-2000:]
        for needle in needles:
            assert needle in err, (needle, err)
        return err

    def one_line_errors(self, script, cases):
        """Each (argv, message): `python script *argv` exits 1 with one 'error:' line holding message, no traceback."""
        for argv, message in cases:
            self.assert_one_line_error(self.run(script, *argv), message)

    @staticmethod
    def free_port():
        """A free TCP port on localhost for a torchrun rendezvous."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def ddp_smoke_train(self, script, ae, out, kind):
        """`torchrun --nproc_per_node=2 script train` (gloo, smoke preset, CADENCE) that must finish on rank 0
        alone at step 6; returns the run's log records."""
        import util

        proc = self.run("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={self.free_port()}",
                        script, "train", "--ae", ae, "--preset", "smoke", "--out", out, "--device", "cpu",
                        *self.CADENCE)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "distributed: 2 processes, backend gloo" in proc.stdout and proc.stdout.count("done:") == 1
        assert util.load_checkpoint(out / "last.pt", kind=kind)["step"] == 6
        return util.read_jsonl(out / "log.jsonl")

    @classmethod
    def grid_size(cls, rows, cols):
        """(width, height) of util.image_grid for rows x cols 32x32 tiles."""
        return cols * cls.TILE + 2, rows * cls.TILE + 2


@pytest.fixture(scope="session")
def cli():
    """The UserCLI helpers: run/popen a script, one-line-error checks, torchrun smoke training, grid sizes."""
    return UserCLI()


@pytest.fixture(scope="session")
def playground_module():
    """playground_module(name) -> the module playground/NAME.py, imported with playground/ on sys.path only
    while it imports."""
    def load(name):
        with pytest.MonkeyPatch.context() as mp:
            mp.syspath_prepend(str(ROOT / "playground"))
            return importlib.import_module(name)

    return load
