"""prestage_train.py end to end on tiny data: training lowers the loss, resume is exact, eval-only,
DDP with gloo, and every bad input gives one clear line."""
import json

import pytest
import torch

import prestage_train
import trainer
import util
from util import UserError


def _run(*argv):
    return prestage_train.main([str(a) for a in argv])


def _weights(path, key="model"):
    return util.load_checkpoint(path)[key]


def test_kl_weight_is_cyclical():
    w = [prestage_train.kl_weight_at(s, 100, 1.0, cycles=2, ramp=0.5) for s in range(100)]
    assert w[0] == 0 and w[25] == pytest.approx(1.0) and w[49] == 1.0  # ramp over the first half of each cycle
    assert w[12] == pytest.approx(12 / 25) and w[50] == 0 and w[60] == pytest.approx(10 / 25)


@pytest.mark.parametrize("model", ["vae", "vqvae"])
def test_smoke_run_lowers_reconstruction_loss(tmp_path, tiny_data, model):
    out = tmp_path / model
    _run("--model", model, "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 40,
         "--disc-start", 30, "--log-every", 5, "--val-every", 20, "--ckpt-every", 20)
    records = util.read_jsonl(out / "log.jsonl")
    rec = [r["loss/rec"] for r in records if "loss/rec" in r]
    assert rec[-1] < 0.7 * rec[0]
    assert any("val/ssim" in r for r in records)
    keys = set().union(*records)
    assert {"loss/g", "loss/d", "w/gan", "lr", "images_per_s"} <= keys  # GAN on after disc_start
    assert ("w/kl" in keys) == (model == "vae") and ("val/codebook_usage" in keys) == (model == "vqvae")
    assert {"val/swd_32", "val/swd_16"} <= keys  # texture lost per pyramid level, logged at every validation
    config = json.loads((out / "config.json").read_text())
    ckpt = util.load_checkpoint(out / "best.pt", kind="stage1")
    assert ckpt["config"]["model"] == config["model"] == model and "perceptual_used" in config
    assert list((out / "samples").glob("recon_*.png"))


def test_focal_frequency_loss_is_logged_and_refused_below_zero(tmp_path, tiny_data):
    out = tmp_path / "ffl"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 4, "--log-every", 1,
         "--freq-weight", 2.0, "--freq-alpha", 0.5)
    records = [r for r in util.read_jsonl(out / "log.jsonl") if "loss/rec" in r]
    assert len(records) == 4 and all(r["loss/freq"] > 0 for r in records)
    assert util.load_checkpoint(out / "best.pt", kind="stage1")["config"]["freq_weight"] == 2.0
    with pytest.raises(UserError, match="--freq-weight"):
        _run("--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "bad", "--freq-weight", -1)
    _run("--model", "vae", "--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "off", "--steps", 2)
    assert all("loss/freq" not in r for r in util.read_jsonl(tmp_path / "off" / "log.jsonl"))


def test_feature_matching_runs_with_the_gan_only(tmp_path, tiny_data):
    out = tmp_path / "fm"
    _run("--model", "vae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 6, "--disc-start", 3,
         "--log-every", 1, "--fm-weight", 1.0)
    records = [r for r in util.read_jsonl(out / "log.jsonl") if "loss/rec" in r]
    assert [("loss/fm" in r) for r in records] == [False] * 3 + [True] * 3  # from disc_start, as the GAN
    assert all(r["loss/fm"] > 0 for r in records[3:])
    with pytest.raises(UserError, match="--fm-weight"):
        _run("--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "bad", "--fm-weight", -0.5)


def test_disc_lr_mult_scales_the_discriminator_rate_only(tmp_path, tiny_data):
    out = tmp_path / "ttur"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 5, "--disc-start", 2,
         "--disc-lr-mult", 4.0)
    state = util.load_checkpoint(out / "last.pt")
    lr, lr_disc = state["opt"]["param_groups"][0]["lr"], state["opt_disc"]["param_groups"][0]["lr"]
    last = trainer.lr_at(state["step"] - 1, state["config"])  # the rate of the last step taken
    assert lr == pytest.approx(last) and lr_disc == pytest.approx(4.0 * last) and last > 0
    with pytest.raises(UserError, match="--disc-lr-mult"):
        _run("--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "bad", "--disc-lr-mult", 0)


def test_highpass_discriminator_trains_and_resumes_as_built(tmp_path, tiny_data):
    out = tmp_path / "hp"
    _run("--model", "vae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 4, "--disc-start", 2,
         "--log-every", 1, "--disc-highpass")
    assert all("loss/d" in r for r in util.read_jsonl(out / "log.jsonl") if r["step"] > 2 and "loss/rec" in r)
    assert util.load_checkpoint(out / "last.pt")["config"]["disc_highpass"] is True
    _run("--resume", out, "--steps", 6)  # the discriminator is rebuilt with the high-pass input it was saved with
    assert util.load_checkpoint(out / "last.pt")["step"] == 6


def test_discriminator_regularisers_are_logged_from_disc_start_and_refused_below_zero(tmp_path, tiny_data):
    out = tmp_path / "reg"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 6, "--disc-start", 3,
         "--log-every", 1, "--r1-weight", 2.0, "--lecam-weight", 0.5)
    records = [r for r in util.read_jsonl(out / "log.jsonl") if "loss/rec" in r]
    assert [("loss/r1" in r, "loss/lecam" in r) for r in records] == [(False, False)] * 3 + [(True, True)] * 3
    assert all(r["loss/r1"] > 0 for r in records[3:])
    state = util.load_checkpoint(out / "last.pt")
    assert (state["config"]["r1_weight"], state["config"]["lecam_weight"]) == (2.0, 0.5)
    plain = tmp_path / "plain"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", plain, "--steps", 4, "--disc-start", 3)
    assert "lecam" not in util.load_checkpoint(plain / "last.pt")  # no anchors without the regulariser
    for flag in ("--r1-weight", "--lecam-weight"):
        with pytest.raises(UserError, match=flag):
            _run("--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "bad", flag, -0.1)
        assert not (tmp_path / "bad").exists()


def test_the_discriminator_is_told_z_unless_no_disc_z(tmp_path, tiny_data):
    for flag, told in (((), True), (("--no-disc-z",), False)):
        out = tmp_path / f"dz{told}"
        _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 4, "--disc-start", 2,
             *flag)
        state = util.load_checkpoint(out / "last.pt")
        assert any(k.startswith("z_embed.") for k in state["disc"]) == told
        assert state["config"]["disc_z"] == told and state["config"]["conditional"]  # the autoencoder still is


def test_fsq_run_records_the_grid_it_quantises_to_and_refuses_codebook_flags(tmp_path, tiny_data):
    out = tmp_path / "fsq"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 4, "--disc-start", 2,
         "--quantizer", "fsq", "--fsq-levels", "4,3,3")
    state = util.load_checkpoint(out / "last.pt")
    assert (state["config"]["n_embed"], state["config"]["embed_dim"]) == (36, 3)  # not the smoke preset's 32 codes
    model, _ = prestage_train.load_autoencoder(out / "best.pt", torch.device("cpu"))
    assert model.n_embed == 36 and model.quantizer.codebook.shape == (36, 3)
    _run("--resume", out, "--steps", 6)
    assert util.load_checkpoint(out / "last.pt")["step"] == 6
    for argv, flag in ((("--n-embed", 64), "--n-embed"), (("--no-vq-ema",), "--no-vq-ema"),
                       (("--fsq-levels", "4,2"), "--fsq-levels 4,2"), (("--fsq-levels", ""), "--fsq-levels ")):
        with pytest.raises(UserError, match=flag):
            _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "bad",
                 "--quantizer", "fsq", *argv)
    with pytest.raises(UserError, match="--quantizer"):
        _run("--model", "vae", "--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "bad", "--quantizer", "fsq")
    with pytest.raises(UserError, match="--fsq-levels: applies only with --quantizer fsq"):
        _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "bad", "--fsq-levels",
             "4,4")
    assert not (tmp_path / "bad").exists()


def test_gan_is_off_before_disc_start(tmp_path, tiny_data):
    out = tmp_path / "r"
    _run("--model", "vae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 6, "--disc-start", 4,
         "--log-every", 1)
    records = util.read_jsonl(out / "log.jsonl")
    assert all("loss/g" not in r for r in records if r["step"] <= 4)
    assert all("loss/g" in r for r in records if r["step"] > 4 and "loss/rec" in r)


def _gan_task(gan_loss, **extra):
    """A smoke-preset VQ-VAE task with the GAN and feature matching on from step 0, and one batch."""
    cfg = trainer.preset_values(prestage_train.HYPERS, prestage_train.PRESETS, "smoke")
    cfg.update(model="vqvae", conditional=True, num_z=8, disc_start=0, fm_weight=1.0, gan_loss=gan_loss, **extra)
    val = (torch.zeros(1, 1, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    task = prestage_train.StageOneTask(cfg, torch.device("cpu"), val)
    task.nets = dict(task.models)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    return task, x, torch.tensor([0, 3, 7])


@pytest.mark.parametrize("gan_loss,r1,lecam", [("hinge", 0.0, 0.0), ("nonsat", 0.0, 0.0), ("hinge", 2.0, 0.3)])
def test_gan_step_equals_separate_discriminator_passes(gan_loss, r1, lecam):
    """One discriminator pass on real + fake, a frozen pass for the generator and reused real features give the
    gradients of the textbook form: separate real and fake passes, the generator's through a trainable D, and
    R1 and LeCam on passes of their own."""
    from model_discriminator import (LeCamAnchors, adaptive_gan_weight, d_loss, feature_matching_loss,
                                     generator_loss, r1_penalty)
    task, x, z = _gan_task(gan_loss, r1_weight=r1, lecam_weight=lecam)
    params, disc = list(task.model.parameters()), task.disc
    recon = task.model(x, z)["recon"]
    rec, perc = task.reconstruction_loss(recon, x)
    nll = rec + task.config["perceptual_weight"] * perc
    # the reference, written out: every pass separate, D trainable throughout
    logits, fake_f = disc(recon, z, features=True)
    g = generator_loss(logits, gan_loss)
    with torch.no_grad():
        real_f = disc(x, z, features=True)[1]
    ref = adaptive_gan_weight(nll, g, task.model.decoder.last_layer) * task.config["disc_weight"] * g
    ref = ref + feature_matching_loss(fake_f, real_f)
    ref_grads = torch.autograd.grad(ref, params, retain_graph=True, allow_unused=True)
    ref_d = d_loss(gan_loss, disc(x, z), disc(recon.detach(), z))
    ref_reg = torch.zeros(())
    if r1:
        real = x.detach().requires_grad_(True)
        ref_reg = ref_reg + r1 / 2 * r1_penalty(disc(real, z), real)
    if lecam:
        ref_reg = ref_reg + lecam * LeCamAnchors()(disc(x, z), disc(recon.detach(), z))
    ref_d_grads = torch.autograd.grad(ref_d + ref_reg, list(disc.parameters()))
    # the trainer's form
    logs = {}
    d_real, d_fake, real_features, reg = task.discriminator_pass(x, recon.detach(), z, logs)
    assert ("loss/r1" in logs, "loss/lecam" in logs) == (r1 > 0, lecam > 0)
    torch.testing.assert_close(reg, ref_reg, rtol=1e-5, atol=1e-7)
    logs = {}
    adv = task.adversarial_loss(recon, z, nll, real_features, logs)
    assert all(p.requires_grad for p in disc.parameters())  # unfrozen again for its own update
    grads = torch.autograd.grad(adv, params, retain_graph=True, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert logs["loss/fm"] > 0 and torch.isfinite(logs["w/gan"])
    adv.backward()
    assert all(p.grad is None for p in disc.parameters())  # no weight gradients for D from the generator's loss
    new_d = d_loss(gan_loss, d_real, d_fake)
    torch.testing.assert_close(new_d, ref_d, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(new_d + reg, list(disc.parameters())), ref_d_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_discriminator_is_unfrozen_when_the_generator_pass_fails():
    task, x, z = _gan_task("hinge")
    recon = task.model(x, z)["recon"]
    with pytest.raises(RuntimeError):
        task.adversarial_loss(recon[:, :, :5], z, recon.mean(), [], {})  # too small for the PatchGAN
    assert all(p.requires_grad for p in task.disc.parameters())


@pytest.mark.parametrize("model,extra", [("vae", ()), ("vqvae", ()),
                                         ("vqvae", ("--r1-weight", 1.0, "--lecam-weight", 0.3))])
def test_resume_matches_uninterrupted_run(tmp_path, tiny_data, model, extra):
    common = ["--model", model, "--preset", "smoke", "--data", tiny_data, "--steps", 10, "--disc-start", 3, *extra]
    _run(*common, "--out", tmp_path / "straight")
    _run(*common, "--out", tmp_path / "chunked", "--stop-at", 5)
    assert util.load_checkpoint(tmp_path / "chunked" / "last.pt")["step"] == 5
    _run("--resume", tmp_path / "chunked")
    a, b = tmp_path / "straight" / "last.pt", tmp_path / "chunked" / "last.pt"
    keys = ("model", "disc", "lecam") if extra else ("model", "disc")
    if extra:  # the LeCam anchors averaged every GAN step, across the pause
        assert int(util.load_checkpoint(b)["lecam"]["count"]) == 10 - 3
    for key in keys:
        wa, wb = _weights(a, key), _weights(b, key)
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), f"{key}.{name} differs after resume"
    steps = [r["step"] for r in util.read_jsonl(tmp_path / "chunked" / "log.jsonl") if "loss/rec" in r]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # the log continues, no duplicated steps


def test_eval_only_reports_test_metrics(vae_run, tiny_data, capsys, tmp_path):
    _run("--eval-only", "--split", "test", "--ckpt", vae_run / "best.pt", "--data", tiny_data, "--out-json", tmp_path / "m.json")
    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):])
    assert metrics["split"] == "test" and 0 < metrics["test/ssim"] <= 1 and metrics["test/psnr"] > 0
    assert json.loads((tmp_path / "m.json").read_text())["test/ssim"] == pytest.approx(metrics["test/ssim"])


def test_dry_run_prints_resolved_config(capsys, tiny_data):
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--n-embed", 64, "--dry-run")
    out = capsys.readouterr().out
    assert "preset: smoke" in out and "n_embed" in out and " 64" in out


def test_decoder_top_blocks_flag_reaches_the_checkpoint_and_is_refused_below_zero(tmp_path, tiny_data):
    out = tmp_path / "top"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 1, "--val-every", 1,
         "--decoder-top-blocks", 1)
    ckpt = util.load_checkpoint(out / "last.pt", kind="stage1")
    assert ckpt["config"]["decoder_top_blocks"] == 1 == ckpt["model_config"]["decoder_top_blocks"]
    model, _ = prestage_train.load_autoencoder(out / "last.pt", torch.device("cpu"))
    assert [sum(m.__class__.__name__ == "ResBlock" for m in lv) for lv in model.decoder.levels] == [2, 3]
    with pytest.raises(UserError, match="--decoder-top-blocks -1: must be >= 0"):
        _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "neg",
             "--decoder-top-blocks", -1)
    assert not (tmp_path / "neg").exists()


def test_decoder_extra_block_flag_reaches_the_checkpoint(tmp_path, tiny_data):
    out = tmp_path / "matched"
    _run("--model", "vae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 1, "--val-every", 1,
         "--no-decoder-extra-block")
    ckpt = util.load_checkpoint(out / "last.pt", kind="stage1")
    assert ckpt["config"]["decoder_extra_block"] is False and ckpt["model_config"]["decoder_extra_block"] is False
    model, _ = prestage_train.load_autoencoder(out / "last.pt", torch.device("cpu"))
    assert [sum(m.__class__.__name__ == "ResBlock" for m in lv) for lv in model.decoder.levels] == [1, 1]


def test_vq_grad_flag_reaches_the_quantiser_and_the_checkpoint(tmp_path, tiny_data):
    out = tmp_path / "rot"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 2, "--val-every", 2,
         "--vq-grad", "rotation")
    ckpt = util.load_checkpoint(out / "last.pt", kind="stage1")
    assert ckpt["config"]["vq_grad"] == "rotation" and ckpt["model_config"]["grad"] == "rotation"
    model, _ = prestage_train.load_autoencoder(out / "last.pt", torch.device("cpu"))
    assert model.quantizer.grad == "rotation"


def test_a_vqvae_checkpoint_from_before_vq_grad_loads_straight_through(vqvae_run, tmp_path):
    # written before the hyperparameter existed: neither its config nor its model_config names it
    state = util.load_checkpoint(vqvae_run / "best.pt", kind="stage1")
    state.pop("_path")
    del state["config"]["vq_grad"], state["model_config"]["grad"]
    util.save_checkpoint(state, tmp_path / "old.pt")
    model, _ = prestage_train.load_autoencoder(tmp_path / "old.pt", torch.device("cpu"))
    assert model.quantizer.grad == "ste"


@pytest.mark.parametrize("model, flag, value, kind", [("vae", "--vq-grad", "rotation", "vqvae"),
                                                      ("vae", "--n-embed", 64, "vqvae"),
                                                      ("vae", "--no-vq-ema", None, "vqvae"),
                                                      ("vqvae", "--kl-weight", 1e-3, "vae")])
def test_a_flag_of_the_other_model_kind_is_refused(tiny_data, tmp_path, model, flag, value, kind):
    with pytest.raises(UserError, match=f"^{flag}: applies only with --model {kind}, and this run is --model {model}$"):
        _run("--model", model, "--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "x", flag,
             *([] if value is None else [value]))  # a switch takes no value
    assert not (tmp_path / "x").exists()


def test_bad_inputs_give_one_line(tmp_path, tiny_data, vae_run):
    with pytest.raises(UserError, match="no such"):
        _run("--preset", "smoke", "--data", tmp_path / "missing", "--out", tmp_path / "x")
    with pytest.raises(UserError, match="a run already exists"):
        _run("--preset", "smoke", "--data", tiny_data, "--out", vae_run)
    with pytest.raises(UserError, match="cannot change on resume: --model vqvae"):
        _run("--resume", vae_run, "--model", "vqvae")
    diff = util.save_checkpoint({"kind": "diffusion", "config": {}}, tmp_path / "diff.pt")
    with pytest.raises(UserError, match="is a 'diffusion' checkpoint, expected stage1"):
        _run("--eval-only", "--ckpt", diff)


def test_nan_loss_stops_naming_step_and_term(tmp_path, tiny_data):
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"non-finite loss at step \d+: loss/\w+") as err:
        _run("--preset", "smoke", "--data", tiny_data, "--out", out, "--lr", "1e30", "--steps", 30, "--disc-start", 100)
    assert "training stopped" in str(err.value)
    if (out / "last.pt").exists():  # whatever was kept was saved before the bad step and is finite
        state = util.load_checkpoint(out / "last.pt")
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_error_is_one_line_without_traceback(tmp_path, cli):
    proc = cli.run("prestage_train.py", "--preset", "smoke", "--data", tmp_path / "nowhere")
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_ddp_two_processes_gloo(tmp_path, tiny_data, cli):
    out = tmp_path / "ddp"
    proc = cli.run("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={cli.free_port()}",
                   "prestage_train.py", "--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out,
                   "--device", "cpu", "--r1-weight", "1", "--lecam-weight", "0.3")  # R1 differentiates a DDP pass
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distributed: 2 processes, backend gloo" in proc.stdout
    ckpt = util.load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 8
    records = util.read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in records if "loss/rec" in r] == [2, 4, 6, 8]  # rank 0 logs alone, once per step


def test_random_crops_are_windows_of_each_slice_at_uniform_offsets():
    images = torch.arange(6 * 8 * 8, dtype=torch.int64).reshape(6, 1, 8, 8)  # every pixel value unique
    crops = prestage_train.random_crops(images, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 1, 4, 4)
    for im, crop in zip(images, crops):
        top, left = divmod(int(crop[0, 0, 0] - im[0, 0, 0]), 8)  # the crop's first pixel names its offset
        assert torch.equal(crop, im[:, top: top + 4, left: left + 4])
    again = prestage_train.random_crops(images, 4, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)
    # offsets 0..4 both ways, each drawn about equally often over many slices
    tops = prestage_train.random_crops(torch.arange(64).reshape(1, 1, 8, 8).expand(5000, 1, 8, 8), 4,
                                       torch.Generator().manual_seed(1))[:, 0, 0, 0] // 8
    counts = torch.bincount(tops, minlength=5)
    assert len(counts) == 5 and counts.min() > 900


def test_crop_steps_train_on_crops_and_validate_on_whole_slices(tmp_path, tiny_data, monkeypatch):
    seen = []
    step = prestage_train.StageOneTask.train_step

    def spy(self, batch, i):
        logs = step(self, batch, i)
        seen.append((i, self.last_input_size))
        return logs
    forward = prestage_train.StageOneTask.reconstruction_loss

    def size_spy(self, recon, x):
        self.last_input_size = x.shape[-1]
        return forward(self, recon, x)
    monkeypatch.setattr(prestage_train.StageOneTask, "train_step", spy)
    monkeypatch.setattr(prestage_train.StageOneTask, "reconstruction_loss", size_spy)
    out = tmp_path / "crop"
    _run("--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out", out, "--steps", 6, "--disc-start", 2,
         "--val-every", 6, "--crop-size", 16, "--crop-steps", 4)
    assert [size for _, size in sorted(seen)] == [16] * 4 + [32] * 2  # the PatchGAN (from step 2) takes crops too
    val = [r for r in util.read_jsonl(out / "log.jsonl") if "val/ssim" in r]
    assert val and 0 < val[-1]["val/ssim"] <= 1  # validation saw whole 32x32 slices
    assert util.load_checkpoint(out / "last.pt")["config"]["crop_steps"] == 4


@pytest.mark.parametrize("flags, message", [
    (["--crop-size", 16], "^--crop-size 16: does nothing without --crop-steps N"),
    (["--crop-steps", 3], "^--crop-steps 3: does nothing without --crop-size N"),
    (["--crop-size", 32, "--crop-steps", 3], "^--crop-size 32: must be smaller than the 32x32 slice and a multiple of 2"),
    (["--crop-size", 15, "--crop-steps", 3], "^--crop-size 15: must be smaller"),
    (["--crop-size", 8, "--crop-steps", 3, "--disc-start", 1, "--perceptual", "none"],
     "^--crop-size 8: too small for the PatchGAN's 2 stride-2 layers, which start at step 1"),
    (["--crop-size", 8, "--crop-steps", 3], r"^--crop-size 8: smaller than the 11x11 the perceptual loss --perceptual "
                                            r"msssim needs; give --crop-size 12 or more, or --perceptual none"),
    (["--crop-size", 16, "--crop-steps", 8], "^--crop-steps 8: at or past --steps 8, so the run would never train on "
                                             "whole slices"),
])
def test_bad_crops_are_refused_in_one_line(tiny_data, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        _run("--model", "vae", "--preset", "smoke", "--data", tiny_data, "--out", tmp_path / "x", *flags)
    assert not (tmp_path / "x").exists()
