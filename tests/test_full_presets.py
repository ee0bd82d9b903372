"""The `full` presets (the user's 256x256 GPU recipe) executed on CPU: one optimiser step of each trainer at
batch 1 with every path on (the PatchGAN from step 0, validation, the sample preview, best.pt and last.pt),
then the checkpoint reloaded and used. Shapes follow the real recipe: 256x256 slices, 32x32x4 latents, a
32x32 code grid. About 2 minutes of the suite; `-m "not full"` leaves them out."""
import math
import shutil

import pytest
import torch
from PIL import Image

import pixelCNN
import prestage_train
import stable_diffusion
import stage_two
import util

pytestmark = pytest.mark.full
ONE_STEP = ["--steps", 1, "--batch-size", 1, "--log-every", 1, "--val-every", 1, "--ckpt-every", 1]


@pytest.fixture(scope="module", autouse=True)
def both_cores():
    """These models are wide enough for a second thread to pay (the rest of the suite runs on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def short_previews():
    """Two preview slices, not eight: each 256x256 decode costs ~5 s of the suite on CPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage_two, "PREVIEW_SLICES", 2)
        yield


@pytest.fixture(scope="module")
def data256(tmp_path_factory, disc_slices):
    """An OASIS-layout folder of 256x256 slices: one subject per split, z-indices 0, 15 and 31 in train, 15 in
    validate and test (num_z 32)."""
    import dataset

    root = tmp_path_factory.mktemp("data256")
    images, zs, _ = disc_slices(1, size=256)
    for split in dataset.SPLITS:
        folder = root / f"keras_png_slices_{split}"
        folder.mkdir()
        # one validate slice: at 256x256 each reconstruction costs ~9 s of the suite on CPU
        for z in (0, 15, 31) if split == "train" else (15,):
            Image.fromarray(images[z, 0].numpy()).save(folder / f"case_{split}_slice_{z}.nii.png")
    return root


def _run(main, *argv):
    assert main([str(a) for a in argv]) == 0


def _finite_log(run_dir):
    """Every number logged by the run, checked finite; returns the records."""
    records = util.read_jsonl(run_dir / "log.jsonl")
    numbers = [v for r in records for v in r.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) for v in numbers)
    return records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of this module's runs, removed afterwards: full-preset checkpoints are 1-2.5 GB each."""
    root = tmp_path_factory.mktemp("full")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stage_one(runs, data256):
    """A one-step full-preset VQ-VAE run (its best.pt feeds both priors)."""
    out = runs / "vq"
    _run(prestage_train.main, "--model", "vqvae", "--preset", "full", "--data", data256, "--out", out, *ONE_STEP,
         "--disc-start", 0)
    return out


@pytest.mark.parametrize("model", ["vqvae", "vae"])
def test_full_stage_one_step(runs, data256, stage_one, model):
    out = stage_one if model == "vqvae" else runs / "vae"
    if model == "vae":
        _run(prestage_train.main, "--model", "vae", "--preset", "full", "--data", data256, "--out", out, *ONE_STEP,
             "--disc-start", 0)
    records = _finite_log(out)
    keys = set().union(*records)
    assert {"loss/rec", "loss/g", "loss/d", "w/gan", "val/ssim"} <= keys  # the GAN ran in this one step
    assert ("w/kl" in keys) == (model == "vae")
    assert util.load_checkpoint(out / "last.pt", kind="stage1")["step"] == 1
    ae, ckpt = prestage_train.load_autoencoder(out / "best.pt", torch.device("cpu"))
    assert ckpt["model_config"]["resolution"] == 256 and ckpt["model_config"]["ch"] == 128
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    with torch.no_grad():
        latent = ae.encode_latent(x, torch.tensor([15]))
        assert latent.shape == (1, 4, 32, 32)
        assert ae.decode(latent, torch.tensor([15])).shape == (1, 1, 256, 256)


def test_full_diffusion_step(runs, tmp_path, stage_one):
    out = runs / "ldm"
    _run(stable_diffusion.main, "train", "--ae", stage_one / "best.pt", "--preset", "full", "--out", out, *ONE_STEP,
         "--sample-steps", 2)
    records = _finite_log(out)
    assert {"loss/diffusion", "val/loss"} <= set().union(*records)
    ckpt = util.load_checkpoint(out / "best.pt", kind="diffusion")
    assert ckpt["config"]["latent_shape"] == [4, 32, 32] and ckpt["config"]["model_channels"] == 192
    with Image.open(next((out / "samples").glob("*.png"))) as im:
        assert im.size[1] >= 256  # the preview decodes full-size slices
    _run(stable_diffusion.main, "sample", "--ckpt", out / "best.pt", "--z", "3", "--steps", 2, "--out", tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        assert im.size[1] >= 256


def test_full_pixelcnn_step(runs, stage_one):
    out = runs / "pcnn"
    _run(pixelCNN.main, "train", "--ae", stage_one / "best.pt", "--preset", "full", "--out", out, *ONE_STEP)
    records = _finite_log(out)
    assert {"loss/ce", "val/bits_per_code"} <= set().union(*records)
    ckpt = util.load_checkpoint(out / "best.pt", kind="pixelcnn")
    assert ckpt["config"]["grid"] == [32, 32] and ckpt["config"]["hidden"] == 192
    assert any((out / "samples").glob("*.png"))
