"""Inputs a new user gives by mistake, each refused in one line before any work, with nothing on disk changed:
metrics written over a checkpoint, flags of another mode, a finished run resumed backwards, devices this repo
does not run on, a discriminator deeper than the slice, out-of-range decays, 16-bit tissue maps."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import demo
import pixelCNN
import prestage_train
import stable_diffusion as sd
import util
from model_discriminator import PatchDiscriminator
from util import UserError


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _eval(ckpt, data, out_json):
    return prestage_train.main(["--eval-only", "--ckpt", str(ckpt), "--data", str(data), "--split", "validate",
                                "--out-json", str(out_json)])


def test_metrics_json_never_lands_on_a_checkpoint_or_a_folder(vqvae_run, tiny_data):
    before = _digests(vqvae_run)
    with pytest.raises(UserError, match=r"--out-json .*best\.pt: not a \.json file name"):
        _eval(vqvae_run / "best.pt", tiny_data, vqvae_run / "best.pt")
    with pytest.raises(UserError, match=r"--out-json .*: is a folder; give a file name such as"):
        _eval(vqvae_run / "best.pt", tiny_data, vqvae_run)
    (vqvae_run / "notes.json").write_bytes(b"\x80PK not json")
    with pytest.raises(UserError, match=r"notes\.json: exists and is not a JSON file; it is left as it is"):
        _eval(vqvae_run / "best.pt", tiny_data, vqvae_run / "notes.json")
    (vqvae_run / "notes.json").unlink()
    assert _digests(vqvae_run) == before


def test_metrics_json_goes_into_a_new_folder(vqvae_run, tiny_data, tmp_path):
    out = tmp_path / "new" / "deeper" / "m.json"
    assert _eval(vqvae_run / "best.pt", tiny_data, out) == 0
    assert json.loads(out.read_text())["split"] == "validate"


def test_training_flags_of_eval_only_are_refused(tiny_data, tmp_path):
    for flags in (["--ckpt", "x.pt"], ["--out-json", "m.json"]):
        with pytest.raises(UserError, match=f"{flags[0]}: applies only with --eval-only"):
            prestage_train.main([*flags, "--preset", "smoke", "--data", str(tiny_data), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, named", [(["--lr", "1e-3"], "--lr"), (["--model", "vae"], "--model"),
                                          (["--no-vq-ema"], "--no-vq-ema"), (["--overwrite"], "--overwrite"),
                                          (["--size", "32"], "--size")])
def test_flags_of_training_given_to_eval_only_are_refused(vqvae_run, tiny_data, tmp_path, flags, named):
    # the checkpoint decides the model: a flag that would change it is not silently ignored
    with pytest.raises(UserError, match=f"^{named}: does not apply with --eval-only .*takes --ckpt, --split, "):
        prestage_train.main(["--eval-only", "--ckpt", str(vqvae_run / "best.pt"), "--data", str(tiny_data), *flags,
                             "--out-json", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("name", ["tpu", "mps", "cuda:x", "CPU", "cpu0"])
def test_device_names_other_than_cpu_and_cuda_are_refused(name, tiny_data, tmp_path):
    with pytest.raises(UserError, match=f"--device {name}: expected auto, cpu, cuda or cuda:N"):
        prestage_train.main(["--preset", "smoke", "--data", str(tiny_data), "--device", name,
                             "--out", str(tmp_path / "r")])
    for ok in ("auto", "cpu", "cuda", "cuda:1"):
        assert util.check_device_name(ok) == ok or torch.cuda.is_available()


@pytest.mark.parametrize("size", [32, 33, 64, 100])
def test_discriminator_logit_size_matches_its_forward(size):
    for layers in range(1, 6):
        expected = PatchDiscriminator.logits_size(size, layers)
        disc = PatchDiscriminator(1, 4, layers)
        if expected >= 1:
            assert disc(torch.zeros(1, 1, size, size)).shape[-1] == expected
        else:
            with pytest.raises((RuntimeError, ValueError)):  # a map too small for a 4x4 kernel or a norm
                disc(torch.zeros(1, 1, size, size))


def test_a_discriminator_deeper_than_the_slice_is_refused_before_training(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"--disc-layers 10: at most 3 stride-2 discriminator layers fit a 32x32"):
        prestage_train.main(["--preset", "smoke", "--data", str(tiny_data), "--disc-layers", "10",
                             "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    # the discriminator never runs (weight 0): any depth is fine
    assert prestage_train.main(["--preset", "smoke", "--data", str(tiny_data), "--disc-layers", "10",
                                "--disc-weight", "0", "--dry-run", "--out", str(tmp_path / "r")]) == 0


def test_resume_refuses_fewer_steps_another_out_and_a_file(vqvae_run, tmp_path, capsys):
    before = _digests(vqvae_run)
    done = torch.load(vqvae_run / "last.pt", map_location="cpu", weights_only=True)["step"]
    with pytest.raises(UserError, match=f"--steps 2: the run in .* is already at step {done}; give --steps {done}"):
        prestage_train.main(["--resume", str(vqvae_run), "--steps", "2"])
    with pytest.raises(UserError, match=r"--out .*other: does not apply with --resume"):
        prestage_train.main(["--resume", str(vqvae_run), "--out", str(tmp_path / "other")])
    with pytest.raises(UserError, match=r"--resume .*best\.pt: is a file; give the run's folder"):
        prestage_train.main(["--resume", str(vqvae_run / "best.pt")])
    assert _digests(vqvae_run) == before and not (tmp_path / "other").exists()


def test_resuming_a_finished_run_says_so(vqvae_run, capsys):
    prestage_train.main(["--resume", str(vqvae_run)])
    assert "already finished its" in capsys.readouterr().out


PRIOR_SCRIPTS = {"diffusion": sd, "pixelcnn": pixelCNN}


@pytest.mark.parametrize("script", sorted(PRIOR_SCRIPTS))
@pytest.mark.parametrize("flags, message", [
    (["--ema-decay", "2"], r"--ema-decay 2\.0: must lie in 0\.\.1"),
    (["--ema-decay", "1"], r"--ema-decay 1\.0: must be below 1 \(at 1 the average never moves"),
    (["--ema-decay", "0", "--ema-start", "2"], r"--ema-start 2: there is no EMA to start \(--ema-decay 0\)"),
    (["--ema-start", "6"], r"--ema-start 6: must be below --steps 6"),
])
def test_an_ema_that_cannot_average_is_refused_by_both_priors(vqvae_run, tmp_path, script, flags, message):
    # smoke presets: 6 steps, an EMA of 0.9 in both
    with pytest.raises(UserError, match=message):
        PRIOR_SCRIPTS[script].main(["train", "--ae", str(vqvae_run / "best.pt"), "--preset", "smoke", *flags,
                                    "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_tissue_maps_of_16_bit_levels_are_refused_and_resizes_are_noted(tmp_path, capsys):
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(dataset.DataError, match=r"wide\.png: holds levels up to 65535 \(a I;16 image\)"):
        dataset.read_label_map(tmp_path / "wide.png", 8)
    classes = np.arange(8 * 12).reshape(8, 12) % 4
    Image.fromarray(classes.astype(np.uint16)).save(tmp_path / "ok16.png")  # 16-bit but holding the classes
    got = dataset.read_label_map(tmp_path / "ok16.png", 12)
    assert "is 8x12: padded square and resized to 12x12" in capsys.readouterr().out
    assert got.flags.writeable and np.array_equal(got[2:10], classes)


def test_demo_refuses_a_file_as_its_output_folder(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"keep")
    assert demo.main(["--out", str(tmp_path / "x.pt")]) == 2
    assert "error: --out" in capsys.readouterr().err and (tmp_path / "x.pt").read_bytes() == b"keep"
