"""stable_diffusion.py end to end on tiny data: train on a VAE and a VQ-VAE, exact resume, the three samplers,
evaluate, DDP with gloo, and every bad input as one clear line.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_stable_diffusion.py   (-m 'not ddp' skips torchrun)
"""
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import dataset
import stable_diffusion as sd
import stage_two
import util
from model_diffusion import NoiseSchedule, sample as diffusion_sample
from prestage_train import load_autoencoder
from util import UserError

CPU = torch.device("cpu")


def _sd(*argv):
    return sd.main([str(a) for a in argv])


def _load(path):
    """(EMA UNet, its noise schedule, frozen stage one, checkpoint) of a diffusion checkpoint."""
    model, ae, ckpt = stage_two.load_prior(sd.PRIOR, path, CPU)
    return model, NoiseSchedule(ckpt["config"]["schedule"], ckpt["config"]["timesteps"]), ae, ckpt


def _generate(model, ae, ckpt, z, guidance, callback=None, clip_x0=None):
    """DDIM, 5 steps, seed 0, through the shared stage-two generate."""
    options = dict(sampler="ddim", steps=5, eta=0.0, clip_x0=clip_x0)
    return stage_two.generate(sd.PRIOR, model, ae, ckpt, z, CPU, guidance, options, seed=0, callback=callback)


def _train_ldm(tmp_path_factory, ae_run, name, cli):
    out = tmp_path_factory.mktemp(name) / "run"
    _sd("train", "--ae", ae_run / "best.pt", "--preset", "smoke", "--out", out, *cli.CADENCE)
    return out


@pytest.fixture(scope="session")
def ldm_vae(tmp_path_factory, vae_run, cli):
    """A smoke latent-diffusion run (6 steps) on the smoke VAE."""
    return _train_ldm(tmp_path_factory, vae_run, "ldm_vae", cli)


@pytest.fixture(scope="session")
def ldm_vq(tmp_path_factory, vqvae_run, cli):
    """A smoke latent-diffusion run on the smoke VQ-VAE's quantised code vectors."""
    return _train_ldm(tmp_path_factory, vqvae_run, "ldm_vq", cli)


# ----------------------------------------------------------------------------------------------
# Training


def test_without_an_average_validation_scores_the_trained_weights_once(vqvae_run, tmp_path, cli):
    out = tmp_path / "no_ema"
    _sd("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--ema-decay", 0, "--out", out, *cli.CADENCE)
    val = [r for r in util.read_jsonl(out / "log.jsonl") if "val/loss" in r]
    assert [r["step"] for r in val] == [3, 6] and not any("val/loss_raw" in r for r in val)
    best = util.load_checkpoint(out / "best.pt", kind="diffusion")
    assert "ema" not in best and best["best"] == pytest.approx(min(r["val/loss"] for r in val))


def test_a_prior_refuses_a_stage_one_of_the_other_kind(ldm_vq, vae_run, tmp_path):
    # the smoke VAE's latents have the VQ-VAE's shape, so only the recorded kind tells them apart
    with pytest.raises(UserError, match=r"--ae .*: a VAE, but this latent diffusion model was trained on the latents "
                                        r"of a VQVAE"):
        _sd("sample", "--ckpt", ldm_vq / "best.pt", "--ae", vae_run / "best.pt", "--z", 3, "--steps", 2,
            "--out", tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()


def test_a_prior_refuses_another_stage_one_at_its_recorded_path(ldm_vq, vqvae_run, tmp_path, capsys):
    # The recorded path is relative to where the prior was trained: from another folder it can name another run's
    # checkpoint, whose latents decode to noise. Only the hash tells; an explicit --ae is the user's choice.
    state = util.load_checkpoint(ldm_vq / "best.pt", kind="diffusion")
    state.pop("_path")
    state["ae_sha256"] = "0" * 64  # as if the file at the recorded path had been replaced by another stage one
    util.save_checkpoint(state, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"^--ae not given, and the stage-one checkpoint recorded in .*other\.pt, "
                                        r".*: is not the stage one this latent diffusion model was trained on \(its "
                                        r"sha256 differs.*pass --ae with"):
        _sd("sample", "--ckpt", tmp_path / "other.pt", "--z", 3, "--steps", 2, "--out", tmp_path / "s.png")
    assert not (tmp_path / "s.png").exists()
    capsys.readouterr()
    _sd("sample", "--ckpt", tmp_path / "other.pt", "--ae", vqvae_run / "best.pt", "--z", 3, "--steps", 2,
        "--out", tmp_path / "s.png")
    assert "warning: " in capsys.readouterr().out and (tmp_path / "s.png").exists()
    state.pop("ae_sha256")  # a prior from before hashes were recorded: only the warning
    util.save_checkpoint(state, tmp_path / "older.pt")
    _sd("sample", "--ckpt", tmp_path / "older.pt", "--z", 3, "--steps", 2, "--out", tmp_path / "s2.png")
    assert "warning: " in capsys.readouterr().out and (tmp_path / "s2.png").exists()


@pytest.mark.parametrize("model", ["vae", "vqvae"])
def test_smoke_train_records_scale_factor_stage_one_and_logs(request, tiny_data, model, cli):
    run = request.getfixturevalue("ldm_vae" if model == "vae" else "ldm_vq")
    ae_path = request.getfixturevalue(f"{model}_run") / "best.pt"
    best = util.load_checkpoint(run / "best.pt", kind="diffusion")
    last = util.load_checkpoint(run / "last.pt", kind="diffusion")
    assert last["step"] == 6

    # The cached latents are what the frozen stage one encodes: re-encode the train split independently.
    cache = torch.load(run / "latents.pt", map_location="cpu", weights_only=True)
    ae, _ = load_autoencoder(ae_path, CPU)
    images, z = dataset.load_split(tiny_data, "train", size=32).tensors()
    with torch.no_grad():
        if model == "vae":
            expected = ae.encode(util.to_float(images), z).mode()  # the posterior mean
        else:
            idx = ae.encode_indices(util.to_float(images), z)
            expected = ae.quantizer.codebook[idx].permute(0, 3, 1, 2)  # the quantised code vectors
    assert cache["train"].shape == expected.shape == (len(images), 4, 16, 16)
    torch.testing.assert_close(cache["train"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache["train_z"], z)
    if model == "vqvae":  # every diffused vector is exactly one of the codebook rows
        flat = cache["train"].permute(0, 2, 3, 1).reshape(-1, 4)
        assert (flat[:, None, :] == ae.quantizer.codebook[None]).all(dim=2).any(dim=1).all()

    # scale factor = 1 / std of the train latents, in every checkpoint and in config.json
    scale = 1.0 / cache["train"].double().std().item()
    assert best["scale_factor"] == pytest.approx(scale, rel=1e-5)
    config = json.loads((run / "config.json").read_text())
    assert last["scale_factor"] == best["scale_factor"] == config["scale_factor"]
    assert Path(best["ae_path"]).resolve() == ae_path.resolve()
    assert best["ae_sha256"] == util.file_sha256(ae_path) == cache["ae_sha256"]
    assert best["latent_shape"] == [4, 16, 16] and config["num_z"] == 32 and config["conditional"]
    assert Path(config["data"]) == Path(tiny_data).resolve()

    records = util.read_jsonl(run / "log.jsonl")
    train = [r for r in records if "loss/diffusion" in r]
    assert [r["step"] for r in train] == [2, 4, 6]  # log_every 2
    for r in train:
        assert {"loss_t/q1", "loss_t/q2", "loss_t/q3", "loss_t/q4", "lr", "latents_per_s"} <= r.keys()
        assert 0 < r["loss/diffusion"] < 5 and r["latents_per_s"] > 0 and 0 < r["lr"] <= config["lr"] * (1 + 1e-6)
        quarts = [r[f"loss_t/q{q}"] for q in range(1, 5)]
        assert all(q == "nan" or 0 < q < 10 for q in quarts) and any(q != "nan" for q in quarts)
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [3, 6] and all(math.isfinite(r["val/loss_raw"]) for r in val)
    assert best["best"] == pytest.approx(min(r["val/loss"] for r in val))

    grids = sorted((run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["sample_0000003.png", "sample_0000006.png"]
    with Image.open(grids[-1]) as im:
        assert im.size == cli.grid_size(1, 8)  # 8 z-indices in one row


def test_min_snr_gamma_weights_the_logged_training_loss(tmp_path, vae_run):
    """Same seed, same first batch: the min-SNR run logs the weighted mean, below the plain MSE (v weights < 1)."""
    losses = {}
    for name, extra in (("plain", []), ("snr", ["--min-snr-gamma", 5])):
        out = tmp_path / name
        _sd("train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--out", out, "--steps", 1, "--log-every", 1,
            "--val-every", 1, "--ckpt-every", 1, *extra)
        losses[name] = [r for r in util.read_jsonl(out / "log.jsonl") if "loss/diffusion" in r][0]["loss/diffusion"]
        assert json.loads((out / "config.json").read_text())["min_snr_gamma"] == (5.0 if extra else 0.0)
    assert 0 < losses["snr"] < losses["plain"]


def test_vq_samples_are_snapped_to_codes_before_decoding(ldm_vq, vqvae_run):
    ckpt = util.load_checkpoint(ldm_vq / "best.pt")
    scale = ckpt["scale_factor"]
    ae, _ = load_autoencoder(vqvae_run / "best.pt", CPU)
    cache = torch.load(ldm_vq / "latents.pt", map_location="cpu", weights_only=True)
    codes, z = cache["train"][:4], cache["train_z"][:4]
    book = ae.quantizer.codebook.float()
    d = torch.cdist(book, book) + 1e9 * torch.eye(len(book))
    # move every latent vector by a quarter of the smallest code spacing: the nearest code stays the same
    gen = torch.Generator().manual_seed(0)
    step = torch.randn(codes.shape, generator=gen)
    step = step / step.norm(dim=1, keepdim=True) * 0.25 * d.min()
    clean = stage_two.decode(ae, codes * scale, z, CPU, scale)
    noisy = stage_two.decode(ae, (codes + step) * scale, z, CPU, scale)
    assert torch.equal(clean, noisy)
    with torch.no_grad():
        assert torch.allclose(clean, ae.decode(codes, z).clamp(-1, 1), atol=1e-6)
        assert not torch.allclose(noisy, ae.decode(codes + step, z).clamp(-1, 1), atol=1e-6)  # unsnapped differs


def test_resume_matches_uninterrupted_run(tmp_path, vae_run, capsys, cli):
    common = ["train", "--ae", vae_run / "best.pt", "--preset", "smoke", *cli.CADENCE, "--steps", 8]
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    _sd(*common, "--out", straight)
    capsys.readouterr()
    _sd(*common, "--out", chunked, "--stop-at", 2)  # paused before the first validation (no best yet)
    out = capsys.readouterr().out
    assert "--stop-at 2: saved" in out and "done:" not in out
    _sd("train", "--resume", chunked, "--stop-at", 4)
    assert util.load_checkpoint(chunked / "last.pt")["step"] == 4
    _sd("train", "--resume", chunked)
    assert "done:" in capsys.readouterr().out
    a, b = util.load_checkpoint(straight / "last.pt"), util.load_checkpoint(chunked / "last.pt")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    assert a["scale_factor"] == b["scale_factor"] and a["best"] == b["best"]
    logs = [util.read_jsonl(r / "log.jsonl") for r in (straight, chunked)]
    steps = [[r["step"] for r in log if "loss/diffusion" in r] for log in logs]
    assert steps[0] == steps[1] == [2, 4, 6, 8]  # the log continues without duplicated steps
    losses = [[(r["step"], r.get("loss/diffusion"), r.get("val/loss")) for r in log] for log in logs]
    assert losses[0] == losses[1]
    grid = Path("samples") / "sample_0000008.png"
    assert (straight / grid).read_bytes() == (chunked / grid).read_bytes()


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddpm", 7), ("ddim", 5), ("dpmpp", 5)])
def test_sample_writes_grid_and_gif_and_is_seeded(ldm_vae, tmp_path, capsys, sampler, steps, cli):
    base = ["sample", "--ckpt", ldm_vae / "best.pt", "--sampler", sampler, "--n", 2, "--z", "0,5,9", "--device", "cpu"]
    base += ["--steps", steps] if steps else []
    _sd(*base, "--seed", 3, "--out", tmp_path / "a.png", "--gif", tmp_path / "a.gif")
    out = capsys.readouterr().out
    assert re.search(rf"6 samples \({sampler}, {steps or 100} steps, guidance 1.0\) in [\d.]+s: [\d.]+ ms per image",
                     out)
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == cli.grid_size(2, 3)  # rows = --n, columns = z-indices
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames > 1 and gif.size == cli.grid_size(1, 6)
    _sd(*base, "--seed", 3, "--out", tmp_path / "b.png")
    _sd(*base, "--seed", 4, "--out", tmp_path / "c.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_ddim_eta0_is_deterministic_given_the_start_noise(ldm_vae):
    model, schedule, _, ckpt = _load(ldm_vae / "best.pt")
    x_T = torch.randn(3, *ckpt["latent_shape"], generator=torch.Generator().manual_seed(0))
    z = torch.tensor([0, 5, 9])

    def run(eta, seed):
        return diffusion_sample(model, schedule, x_T.shape, z, sampler="ddim", steps=5, eta=eta,
                                generator=torch.Generator().manual_seed(seed), x_init=x_T)

    assert torch.equal(run(0.0, 0), run(0.0, 1))  # eta 0 draws no noise after x_T
    assert not torch.allclose(run(1.0, 0), run(1.0, 1))


def test_guidance_runs_and_changes_the_samples(ldm_vae, tmp_path, capsys, cli):
    _sd("sample", "--ckpt", ldm_vae / "best.pt", "--steps", 5, "--z", "0,16", "--guidance", 2,
        "--out", tmp_path / "g.png")
    assert "guidance 2.0" in capsys.readouterr().out
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == cli.grid_size(1, 2)
    model, schedule, ae, ckpt = _load(ldm_vae / "best.pt")
    z = torch.tensor([0, 16])
    plain, _ = _generate(model, ae, ckpt, z, 1.0)
    guided, _ = _generate(model, ae, ckpt, z, 2.0)
    assert plain.shape == guided.shape == (2, 1, 32, 32) and not torch.equal(plain, guided)


def test_sampling_keeps_to_the_cores_other_processes_leave_free(ldm_vae, monkeypatch, capsys):
    """stage_two's draws run under trainer.ThreadGovernor: with another process holding one of two cores the
    sampler's steps run on one thread, the note says so on stderr, and the start-up count is back after."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    clock, start = iter(range(0, 10 ** 6, 3)), time.perf_counter() - 10 ** 7

    def busy():  # readings 3 s apart, both cores busy with other processes' work all along
        t = next(clock)
        return 2.0 * t, 0.0, start + t
    monkeypatch.setattr(util, "cpu_times", busy)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    model, schedule, ae, ckpt = _load(ldm_vae / "best.pt")
    threads = []
    pinned = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _generate(model, ae, ckpt, torch.tensor([0, 16]), 1.0, callback=lambda *a: threads.append(
            torch.get_num_threads()))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(pinned)
    assert threads == [1] * 5  # every one of the 5 DDIM steps
    assert "note: other processes kept 2.0 of 2 cores busy: sampling on 1 thread now" in capsys.readouterr().err


def test_x0_clip_defaults_to_training_latent_range(ldm_vae, tmp_path):
    model, schedule, ae, ckpt = _load(ldm_vae / "best.pt")
    cache = torch.load(ldm_vae / "latents.pt", weights_only=True)
    expected = (cache["train"].float() * ckpt["scale_factor"]).abs().max().item()
    assert ckpt["config"]["x0_clip"] == pytest.approx(expected)
    seen = []
    z = torch.tensor([0, 16])

    def record(i, n, x_t, x0_pred):
        seen.append(x0_pred.abs().max().item())

    _generate(model, ae, ckpt, z, 1.0, callback=record, clip_x0=expected)
    assert max(seen) <= expected + 1e-5
    args = stage_two.parse_args(sd.PRIOR, ["sample", "--ckpt", str(ldm_vae / "best.pt")])
    assert sd.PRIOR.sample_options(args, ckpt["config"])["clip_x0"] == pytest.approx(expected)
    args.clip_x0 = 0.0
    assert sd.PRIOR.sample_options(args, ckpt["config"])["clip_x0"] is None  # 0 switches clipping off
    args.clip_x0 = -1.0
    with pytest.raises(UserError, match="--clip-x0 -1.0: must be a finite number >= 0"):
        sd.PRIOR.sample_options(args, ckpt["config"])


def test_evaluate_writes_metrics_json(ldm_vae, tmp_path, quick_eval):
    _sd("evaluate", "--ckpt", ldm_vae / "best.pt", "--n", 1, "--steps", 5, "--out", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("swd", "diversity_ms_ssim", "z_mae", "nn_l2", "ms_per_image"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["n_samples"] == 32 and m["sampler"] == "ddim" and m["steps"] == 5  # --n 1 per z-index
    assert 0 <= m["diversity_ms_ssim"] <= 1 and m["swd"] > 0 and m["ms_per_image"] > 0 and m["z_mae"] >= 0


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_give_one_clear_line(tmp_path, vae_run, ldm_vae):
    ckpt = ldm_vae / "best.pt"
    with pytest.raises(UserError, match="train needs --ae PATH"):
        _sd("train", "--preset", "smoke", "--out", tmp_path / "a")
    with pytest.raises(UserError, match=r"--ae \S+best.pt: is a 'diffusion' checkpoint, expected stage1"):
        _sd("train", "--ae", ckpt, "--preset", "smoke", "--out", tmp_path / "b")
    with pytest.raises(UserError, match=r"--ae \S+missing.pt: no such checkpoint file"):
        _sd("train", "--ae", tmp_path / "missing.pt", "--preset", "smoke", "--out", tmp_path / "c")
    with pytest.raises(UserError, match=r"--ckpt \S+: is a 'stage1' checkpoint, expected diffusion"):
        _sd("sample", "--ckpt", vae_run / "best.pt", "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match=r"--z 0\.\.40: z-indices must lie in 0\.\.31"):
        _sd("sample", "--ckpt", ckpt, "--z", "0..40", "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match=r"cannot change on resume: --model-channels 32 \(run has 16\)"):
        _sd("train", "--resume", ldm_vae, "--model-channels", 32)
    with pytest.raises(UserError, match="a run already exists there; pass --resume"):
        _sd("train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--out", ldm_vae)
    with pytest.raises(UserError, match="a 'stage1' run, not a 'ldm' run"):
        _sd("train", "--resume", vae_run)
    with pytest.raises(UserError, match=r"--steps 500: must lie in 1\.\.100"):
        _sd("evaluate", "--ckpt", ckpt, "--steps", 500)
    with pytest.raises(UserError, match=r"--gif \S+x\.jpg: not an animation file name \(e\.g\. process\.gif\)"):
        _sd("sample", "--ckpt", ckpt, "--out", tmp_path / "s.png", "--gif", tmp_path / "x.jpg")
    with pytest.raises(UserError, match=r"--out \S+s\.txt: not an image file name"):
        _sd("sample", "--ckpt", ckpt, "--out", tmp_path / "s.txt")
    with pytest.raises(UserError, match=r"--clip-x0 nan: must be a finite number >= 0"):
        _sd("sample", "--ckpt", ckpt, "--clip-x0", "nan", "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match="--n 0 .*at least 1"):
        _sd("sample", "--ckpt", ckpt, "--n", 0, "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match=r"--min-snr-gamma -1.0: must be >= 0"):
        _sd("train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--min-snr-gamma", -1, "--out", tmp_path / "g")
    assert not (tmp_path / "g").exists()
    assert not (tmp_path / "s.png").exists()


def test_existing_run_is_refused_before_its_latents_are_touched(tmp_path, ldm_vae, vqvae_run):
    run = tmp_path / "run"
    shutil.copytree(ldm_vae, run)
    before = (run / "latents.pt").read_bytes()
    with pytest.raises(UserError, match="a run already exists"):
        _sd("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--out", run)
    assert (run / "latents.pt").read_bytes() == before


def test_overwrite_with_other_data_rebuilds_the_latent_cache(tmp_path, ldm_vae, vae_run, tiny_data):
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    train_dir = other / "keras_png_slices_train"
    subject = sorted(train_dir.iterdir())[0].name.split("_slice_")[0]
    for f in train_dir.glob(f"{subject}_slice_*"):
        f.unlink()  # one subject (32 slices) fewer
    run = tmp_path / "run"
    shutil.copytree(ldm_vae, run)  # holds a latents.pt of tiny_data for the same stage one
    _sd("train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--data", other, "--out", run, "--overwrite",
        "--steps", 1)
    cache = torch.load(run / "latents.pt", map_location="cpu", weights_only=True)
    assert Path(cache["data"]) == other.resolve() and len(cache["train"]) == 96
    assert json.loads((run / "config.json").read_text())["data"] == str(other.resolve())


def test_cli_errors_are_one_line_without_traceback(tmp_path, vae_run, ldm_vae, cli):
    cases = [
        (["train", "--preset", "smoke", "--out", tmp_path / "x"], "train needs --ae"),
        (["sample", "--ckpt", vae_run / "best.pt", "--out", tmp_path / "s.png"], "expected diffusion"),
        (["sample", "--ckpt", ldm_vae / "best.pt", "--z", "0..40", "--out", tmp_path / "s.png"], "must lie in 0..31"),
    ]
    cli.one_line_errors("stable_diffusion.py", cases)


# ----------------------------------------------------------------------------------------------
# Distributed


@pytest.mark.ddp
def test_ddp_two_processes_gloo(tmp_path, vae_run, cli):
    records = cli.ddp_smoke_train("stable_diffusion.py", vae_run / "best.pt", tmp_path / "ddp", "diffusion")
    assert [r["step"] for r in records if "loss/diffusion" in r] == [2, 4, 6]  # rank 0 logs alone, once per step
    assert [r["step"] for r in records if "val/loss" in r] == [3, 6]
    rates = [r["latents_per_s"] for r in records if "latents_per_s" in r]
    assert all(v > 0 for v in rates)
