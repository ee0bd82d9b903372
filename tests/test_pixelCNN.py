"""pixelCNN.py command line end to end on tiny data: train on a VQ-VAE's codes (and refuse a VAE), exact resume,
seeded and greedy sampling, evaluate, unconditional data, DDP with gloo, and every bad input as one clear line.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_pixelCNN.py   (-m 'not ddp' skips torchrun)
"""
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import pixelCNN
import prestage_train
import stage_two
import trainer as tr
import util
from model_pixelCNN import sample_codes
from util import UserError

CPU = torch.device("cpu")


def _pc(*argv):
    return pixelCNN.main([str(a) for a in argv])


@pytest.fixture(scope="session")
def pcnn_run(tmp_path_factory, vqvae_run, cli):
    """A smoke PixelCNN run (6 steps) on the smoke VQ-VAE's codes."""
    out = tmp_path_factory.mktemp("pcnn") / "run"
    _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--out", out, *cli.CADENCE)
    return out


# ----------------------------------------------------------------------------------------------
# Training


def test_train_refuses_a_vae_naming_vq_vae(tmp_path, vae_run):
    with pytest.raises(UserError, match=r"--ae \S+: is a VAE checkpoint; the PixelCNN .* needs a VQ-VAE"):
        _pc("train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--out", tmp_path / "r")
    assert not (tmp_path / "r" / "codes.pt").exists()


def test_smoke_train_caches_the_vq_codes_and_logs_bits(pcnn_run, vqvae_run, tiny_data, cli):
    ae_path = vqvae_run / "best.pt"
    cache = torch.load(pcnn_run / "codes.pt", map_location="cpu", weights_only=True)
    ae, _ = prestage_train.load_autoencoder(ae_path, CPU)
    for split in ("train", "validate"):  # independent re-encoding with the VQ-VAE's own encode_indices
        images, z = dataset.load_split(tiny_data, split, size=32).tensors()
        with torch.no_grad():
            expected = ae.encode_indices(util.to_float(images), z)
        assert cache[split].dtype == torch.long and cache[split].shape == (len(images), 16, 16)
        assert torch.equal(cache[split], expected)
        assert torch.equal(cache[f"{split}_z"], z)
    assert cache["ae_sha256"] == util.file_sha256(ae_path)

    best = util.load_checkpoint(pcnn_run / "best.pt", kind="pixelcnn")
    last = util.load_checkpoint(pcnn_run / "last.pt", kind="pixelcnn")
    assert last["step"] == 6 and best["grid"] == [16, 16]
    assert Path(best["ae_path"]).resolve() == ae_path.resolve() and best["ae_sha256"] == cache["ae_sha256"]
    config = json.loads((pcnn_run / "config.json").read_text())
    assert config["n_codes"] == 32 and config["num_z"] == 32 and config["conditional"]
    assert Path(config["data"]) == Path(tiny_data).resolve()

    records = util.read_jsonl(pcnn_run / "log.jsonl")
    train = [r for r in records if "loss/ce" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert r["bits_per_code"] == pytest.approx(r["loss/ce"] / math.log(2), rel=1e-5)
        assert 0 < r["bits_per_code"] < 8 and r["grids_per_s"] > 0 and 0 < r["lr"] <= config["lr"] * (1 + 1e-6)
    val = [r for r in records if "val/bits_per_code" in r]
    assert [r["step"] for r in val] == [3, 6] and all(0 < r["val/bits_per_code"] < 8 for r in val)
    assert best["best"] == pytest.approx(min(r["val/bits_per_code"] for r in val))
    grids = sorted((pcnn_run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["sample_0000003.png", "sample_0000006.png"]
    with Image.open(grids[-1]) as im:
        assert im.size == cli.grid_size(1, 8)


def test_code_features_train_on_the_stage_one_codebook_and_sample(tmp_path, vqvae_run, pcnn_run, capsys, cli):
    out = tmp_path / "features"
    _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", *cli.CADENCE, "--code-features", "--out", out)
    codebook = util.load_checkpoint(vqvae_run / "best.pt")["model"]["quantizer.codebook"].float()
    best = util.load_checkpoint(out / "best.pt", kind="pixelcnn")
    assert best["config"]["code_features"] and best["config"]["code_dim"] == codebook.shape[1]
    torch.testing.assert_close(best["model"]["code_vectors"], (codebook - codebook.mean(0)) / codebook.std(0))
    plain = util.load_checkpoint(pcnn_run / "best.pt", kind="pixelcnn")
    assert not plain["config"]["code_features"] and not any(k.startswith("code_") for k in plain["model"])
    capsys.readouterr()
    _pc("sample", "--ckpt", out / "best.pt", "--n", 1, "--z", "0,9", "--device", "cpu", "--out", tmp_path / "s.png")
    assert "2 samples" in capsys.readouterr().out and (tmp_path / "s.png").exists()


def test_a_prior_on_an_fsq_stage_one_draws_its_grid_codes_and_sees_them_as_features(tmp_path, tiny_data, capsys, cli):
    import prestage_train

    ae = tmp_path / "fsq"
    prestage_train.main(["--model", "vqvae", "--preset", "smoke", "--data", str(tiny_data), "--out", str(ae),
                         "--steps", "4", "--quantizer", "fsq", "--fsq-levels", "3,4"])
    out = tmp_path / "pc"
    _pc("train", "--ae", ae / "best.pt", "--preset", "smoke", *cli.CADENCE, "--code-features", "--out", out)
    best = util.load_checkpoint(out / "best.pt", kind="pixelcnn")
    assert best["config"]["n_codes"] == 12 and best["config"]["code_dim"] == 2
    grid = torch.tensor([[a, b] for a in (-1.0, 0.0, 1.0) for b in (-1.0, -0.5, 0.0, 0.5)])
    torch.testing.assert_close(best["model"]["code_vectors"], (grid - grid.mean(0)) / grid.std(0))
    capsys.readouterr()
    _pc("sample", "--ckpt", out / "best.pt", "--n", 1, "--z", "0,9", "--device", "cpu", "--out", tmp_path / "s.png")
    assert "2 samples" in capsys.readouterr().out and (tmp_path / "s.png").exists()


def test_the_ema_holds_the_code_vectors_before_the_first_step(vqvae_run):
    # the EMA is a copy of the network taken before the codebook's vectors are set into it
    ae, _ = stage_two.load_stage_one(pixelCNN.PRIOR, vqvae_run / "best.pt", CPU)
    cfg = tr.preset_values(pixelCNN.HYPERS, pixelCNN.PRESETS, "smoke")
    cfg.update(code_features=True, conditional=True, num_z=ae.num_z, ae="(none)", ae_sha256="")
    codes = torch.randint(0, ae.quantizer.n_embed, (4, 4, 4))
    cache = {"train": codes, "validate": codes[:2], "train_z": torch.zeros(4, dtype=torch.long),
             "validate_z": torch.zeros(2, dtype=torch.long)}
    pixelCNN.PRIOR.complete_config(cfg, cache, ae)
    task = pixelCNN.PixelCNNTask(pixelCNN.PRIOR, cfg, CPU, ae, cache)
    assert task.model.code_vectors.abs().sum() > 0
    assert torch.equal(task.ema.model.code_vectors, task.model.code_vectors)


def test_a_run_from_before_position_code_features_and_the_ema_samples_and_resumes(tmp_path, vqvae_run, capsys,
                                                                                   cli):
    # Runs saved before these hyperparameters existed lack them in config.json and in their checkpoints; they
    # must load as the model they were (no position features, its trained weights), not as today's default.
    out = tmp_path / "old"
    _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", *cli.CADENCE, "--no-position", "--out", out)
    old_keys = ("position", "code_features", "ema_decay")
    for name in ("best.pt", "last.pt"):
        state = torch.load(out / name, map_location="cpu", weights_only=True)
        for key in old_keys:
            del state["config"][key]
        assert not any("pos_proj" in k for k in state["model"])
        del state["ema"]
        util.save_checkpoint(state, out / name)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in old_keys}))
    model, _, ckpt = stage_two.load_prior(pixelCNN.PRIOR, out / "best.pt", CPU)
    assert ckpt["config"]["ema_decay"] == 0.0
    for k, v in model.state_dict().items():  # the weights it was trained to, there being no average
        assert torch.equal(v, ckpt["model"][k]), k
    capsys.readouterr()
    _pc("sample", "--ckpt", out / "best.pt", "--n", 1, "--z", "0,9", "--device", "cpu", "--out", tmp_path / "s.png")
    assert "2 samples" in capsys.readouterr().out
    _pc("train", "--resume", out, "--steps", 8)
    resumed = util.load_checkpoint(out / "last.pt", kind="pixelcnn")
    assert resumed["step"] == 8 and "ema" not in resumed  # decay 0: no average kept


def test_validation_scores_the_ema_that_samples_and_the_trained_weights(pcnn_run):
    ckpt = util.load_checkpoint(pcnn_run / "best.pt", kind="pixelcnn")
    assert ckpt["config"]["ema_decay"] == 0.9  # the smoke preset's
    model, _, _ = stage_two.load_prior(pixelCNN.PRIOR, pcnn_run / "best.pt", CPU)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k]), k
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    vals = [r for r in util.read_jsonl(pcnn_run / "log.jsonl") if "val/bits_per_code" in r]
    assert vals and all(math.isfinite(r["val/bits_per_code"]) and math.isfinite(r["val/bits_per_code_raw"])
                        and r["val/bits_per_code"] != r["val/bits_per_code_raw"] for r in vals)


def test_resume_matches_uninterrupted_run(tmp_path, vqvae_run, capsys, cli):
    # --sample-every 2: sample grids at validations 2, 4, ... counted from the step, so also after a resume;
    # --ema-start 3: the pauses at steps 2 and 4 fall on either side of the EMA's start
    common = ["train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", *cli.CADENCE, "--steps", 8,
              "--sample-every", 2, "--ema-start", 3]
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    _pc(*common, "--out", straight)
    capsys.readouterr()
    _pc(*common, "--out", chunked, "--stop-at", 2)  # paused before the first validation (no best yet)
    out = capsys.readouterr().out
    assert "--stop-at 2: saved" in out and "done:" not in out
    _pc("train", "--resume", chunked, "--stop-at", 4)
    assert util.load_checkpoint(chunked / "last.pt")["step"] == 4
    _pc("train", "--resume", chunked)
    a, b = util.load_checkpoint(straight / "last.pt"), util.load_checkpoint(chunked / "last.pt")
    assert a["step"] == b["step"] == 8 and a["best"] == b["best"]
    for key in ("model", "ema"):  # the smoke preset keeps an EMA
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    logs = [util.read_jsonl(r / "log.jsonl") for r in (straight, chunked)]
    assert [r["step"] for r in logs[1] if "loss/ce" in r] == [2, 4, 6, 8]  # the log continues, no duplicates
    values = [[(r["step"], r.get("loss/ce"), r.get("val/bits_per_code")) for r in log] for log in logs]
    assert values[0] == values[1]
    names = [sorted(p.name for p in (r / "samples").glob("*.png")) for r in (straight, chunked)]
    assert names[0] == names[1] == ["sample_0000006.png", "sample_0000008.png"]
    for name in names[0]:
        assert (straight / "samples" / name).read_bytes() == (chunked / "samples" / name).read_bytes()


def test_unconditional_data_trains_and_samples(tmp_path, tiny_data, capsys, cli):
    plain = tmp_path / "plain"  # the same slices without z-indices (generic file names, split folders)
    for split in ("train", "validate", "test"):
        (plain / split).mkdir(parents=True)
        for i, f in enumerate(sorted((tiny_data / f"keras_png_slices_{split}").glob("*.png"))[:24]):
            shutil.copy(f, plain / split / f"img{i:03d}.png")
    vq = tmp_path / "vq"
    prestage_train.main(["--model", "vqvae", "--preset", "smoke", "--data", str(plain), "--out", str(vq),
                         "--steps", "2", "--val-every", "2"])
    run = tmp_path / "prior"
    _pc("train", "--ae", vq / "best.pt", "--preset", "smoke", "--out", run, "--steps", 3, "--val-every", 3)
    ckpt = util.load_checkpoint(run / "best.pt", kind="pixelcnn")
    assert ckpt["config"]["conditional"] is False and (run / "samples" / "sample_0000003.png").exists()
    _pc("sample", "--ckpt", run / "best.pt", "--n", 2, "--out", tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == cli.grid_size(2, 1)
    assert "2 samples" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^--z 3: this PixelCNN is unconditional .* leave --z out"):
        _pc("sample", "--ckpt", run / "best.pt", "--z", 3, "--out", tmp_path / "z.png")
    with pytest.raises(UserError, match=r"^--n 1: this PixelCNN is unconditional, so --n is the number of samples"):
        _pc("evaluate", "--ckpt", run / "best.pt", "--n", 1, "--no-tissue-maps")
    assert not (tmp_path / "z.png").exists()
    with pytest.raises(UserError, match=r"^--z-maps 2: this stage one's data have no z-index"):
        _pc("train", "--ae", vq / "best.pt", "--preset", "smoke", "--out", tmp_path / "zm", "--z-maps", 2)


def test_z_maps_train_one_map_per_z_index_and_sample(tmp_path, vqvae_run, pcnn_run, capsys, cli):
    out = tmp_path / "zmaps"
    _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", *cli.CADENCE, "--z-maps", 2, "--out", out)
    best = util.load_checkpoint(out / "best.pt", kind="pixelcnn")
    maps = best["model"]["z_map"]
    assert best["config"]["z_maps"] == 2 and maps.shape[:2] == (best["config"]["num_z"] + 1, 2)
    assert maps.abs().sum() > 0  # they start at zero: training moved them
    assert "z_map" not in util.load_checkpoint(pcnn_run / "best.pt", kind="pixelcnn")["model"]
    capsys.readouterr()
    _pc("sample", "--ckpt", out / "best.pt", "--n", 1, "--z", "0,9", "--device", "cpu", "--out", tmp_path / "s.png")
    assert "2 samples" in capsys.readouterr().out and (tmp_path / "s.png").exists()


def test_coarse_trains_its_half_resolution_path_and_samples(tmp_path, vqvae_run, pcnn_run, capsys, cli):
    out = tmp_path / "coarse"
    _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", *cli.CADENCE, "--coarse", 2, "--out", out)
    best = util.load_checkpoint(out / "best.pt", kind="pixelcnn")
    assert best["config"]["coarse"] == 2 and "coarse.convs.1.weight" in best["model"]
    assert best["config"]["kernel_size"] == 3 and best["model"]["coarse.convs.0.weight"].shape[-2:] == (2, 3)
    assert not any(k.startswith("coarse.") for k in util.load_checkpoint(pcnn_run / "best.pt", kind="pixelcnn")["model"])
    capsys.readouterr()
    _pc("sample", "--ckpt", out / "best.pt", "--n", 1, "--z", "0,9", "--device", "cpu", "--out", tmp_path / "s.png")
    assert "2 samples" in capsys.readouterr().out and (tmp_path / "s.png").exists()
    with pytest.raises(UserError, match=r"^--coarse -1: must be >= 0"):
        _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--coarse", -1, "--out", tmp_path / "neg")
    assert not (tmp_path / "neg").exists()


def test_dilation_trains_dilated_stacks_and_samples(tmp_path, vqvae_run, capsys, cli):
    out = tmp_path / "dilated"
    _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", *cli.CADENCE, "--dilation", "2,3", "--out", out)
    best = util.load_checkpoint(out / "best.pt", kind="pixelcnn")
    assert best["config"]["dilation"] == [2, 3]
    model = pixelCNN.PRIOR.build(best["config"])
    assert [layer.v_conv.dilation for layer in model.layers] == [(1, 1), (2, 2), (3, 3)]
    capsys.readouterr()
    _pc("sample", "--ckpt", out / "best.pt", "--n", 1, "--z", "0,9", "--device", "cpu", "--out", tmp_path / "s.png")
    assert "2 samples" in capsys.readouterr().out and (tmp_path / "s.png").exists()


@pytest.mark.parametrize("flags,message", [(["--dilation", ""], r"^--dilation '': give one or more dilations"),
                                           (["--dilation", "0,2"], r"^--dilation 0,2: must be a list of whole"),
                                           (["--n-layers", 1, "--dilation", 2], r"^--dilation 2: does not apply "
                                                                                 r"with --n-layers 1"),
                                           (["--n-layers", 3, "--dilation", "1,2,4"],
                                            r"^--dilation 1,2,4: 3 dilations for the 2 gated layers after the type-A "
                                            r"one \(--n-layers 3\): the last ones would never be used$")])
def test_dilation_refusals(tmp_path, vqvae_run, flags, message):
    with pytest.raises(UserError, match=message):
        _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", *flags, "--out", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation


def test_sample_writes_grid_and_is_seeded(pcnn_run, tmp_path, capsys, cli):
    base = ["sample", "--ckpt", pcnn_run / "best.pt", "--n", 2, "--z", "0,5,9", "--device", "cpu"]
    _pc(*base, "--seed", 3, "--out", tmp_path / "a.png")
    assert re.search(r"6 samples \(temperature 1.0, guidance 1.0\) in [\d.]+s: [\d.]+ ms per image", capsys.readouterr().out)
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == cli.grid_size(2, 3)  # rows = --n, columns = z-indices
    _pc(*base, "--seed", 3, "--out", tmp_path / "b.png")
    _pc(*base, "--seed", 4, "--out", tmp_path / "c.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_temperature_zero_is_greedy_and_ignores_the_seed(pcnn_run, tmp_path):
    base = ["sample", "--ckpt", pcnn_run / "best.pt", "--n", 2, "--z", "0,16", "--temperature", 0]
    _pc(*base, "--seed", 0, "--out", tmp_path / "g0.png")
    _pc(*base, "--seed", 1, "--out", tmp_path / "g1.png")
    assert (tmp_path / "g0.png").read_bytes() == (tmp_path / "g1.png").read_bytes()
    # greedy codes are the argmax of the model's own logits at every position
    model, _, ckpt = stage_two.load_prior(pixelCNN.PRIOR, pcnn_run / "best.pt", CPU)
    z = torch.tensor([0, 16])
    codes = sample_codes(model, tuple(ckpt["grid"]), z, temperature=0.0)
    with torch.no_grad():
        assert torch.equal(model(codes, z).argmax(dim=1), codes)


def test_guidance_reaches_the_sampler(pcnn_run, tmp_path, capsys):
    # The PNG equals the guided codes of sample_codes at the same seed, decoded; and guidance changes it.
    base = ["sample", "--ckpt", pcnn_run / "best.pt", "--n", 1, "--z", "0,16,31", "--seed", 5]
    _pc(*base, "--guidance", 3, "--out", tmp_path / "g3.png")
    assert "(temperature 1.0, guidance 3.0)" in capsys.readouterr().out
    _pc(*base, "--out", tmp_path / "g1.png")
    model, ae, ckpt = stage_two.load_prior(pixelCNN.PRIOR, pcnn_run / "best.pt", CPU)
    z = torch.tensor([0, 16, 31])
    for name, scale in (("g3.png", 3.0), ("g1.png", 1.0)):
        codes = sample_codes(model, tuple(ckpt["grid"]), z, 1.0, torch.Generator().manual_seed(5),
                                      guidance=scale)
        with Image.open(tmp_path / name) as im:
            assert np.array_equal(np.asarray(im), util.image_grid(stage_two.decode(ae, codes, z, CPU), nrow=3))
    assert (tmp_path / "g3.png").read_bytes() != (tmp_path / "g1.png").read_bytes()


def test_top_k_and_top_p_reach_the_sampler(pcnn_run, tmp_path, capsys, quick_eval):
    base = ["sample", "--ckpt", pcnn_run / "best.pt", "--n", 1, "--z", "0,16,31", "--seed", 5]
    _pc(*base, "--top-k", 3, "--top-p", 0.9, "--out", tmp_path / "t.png")
    assert "(temperature 1.0, top-k 3, top-p 0.9, guidance 1.0)" in capsys.readouterr().out
    model, ae, ckpt = stage_two.load_prior(pixelCNN.PRIOR, pcnn_run / "best.pt", CPU)
    z = torch.tensor([0, 16, 31])
    codes = sample_codes(model, tuple(ckpt["grid"]), z, 1.0, torch.Generator().manual_seed(5), top_k=3, top_p=0.9)
    with Image.open(tmp_path / "t.png") as im:
        assert np.array_equal(np.asarray(im), util.image_grid(stage_two.decode(ae, codes, z, CPU), nrow=3))
    _pc("evaluate", "--ckpt", pcnn_run / "best.pt", "--n", 1, "--top-k", 5, "--out", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["top_k"] == 5 and m["top_p"] == 1.0
    n_codes = ckpt["config"]["n_codes"]
    for flags, message in ((["--top-k", n_codes + 1], f"--top-k {n_codes + 1}: must lie in 0..{n_codes}"),
                           (["--top-k", -1], "--top-k -1: must lie in 0.."), (["--top-p", 0], "--top-p 0.0: must lie"),
                           (["--top-p", "nan"], "--top-p nan: must lie in (0, 1]")):
        with pytest.raises(UserError, match=re.escape(message)):
            _pc(*base, *flags, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_guidance_needs_a_prior_trained_with_condition_dropout(pcnn_run, tmp_path):
    ckpt = util.load_checkpoint(pcnn_run / "best.pt", kind="pixelcnn")
    ckpt["config"]["p_uncond"] = 0.0
    plain = util.save_checkpoint({k: v for k, v in ckpt.items() if not k.startswith("_")}, tmp_path / "no_drop.pt")
    with pytest.raises(UserError, match=r"--guidance 2.0: this prior was trained without condition dropout"):
        _pc("sample", "--ckpt", plain, "--guidance", 2, "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match=r"--guidance -1.0: must be a finite number >= 0"):
        _pc("evaluate", "--ckpt", pcnn_run / "best.pt", "--guidance", -1)
    _pc("sample", "--ckpt", plain, "--n", 1, "--z", "3", "--out", tmp_path / "ok.png")  # guidance 1 is fine
    assert (tmp_path / "ok.png").exists()


def test_evaluate_writes_metrics_json(pcnn_run, tmp_path, quick_eval):
    _pc("evaluate", "--ckpt", pcnn_run / "best.pt", "--n", 1, "--out", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ("swd", "diversity_ms_ssim", "z_mae", "nn_l2", "ms_per_image"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert m["n_samples"] == 32 and m["sampler"] == "pixelcnn" and m["temperature"] == 1.0 and m["guidance"] == 1.0
    assert 0 <= m["diversity_ms_ssim"] <= 1 and m["swd"] > 0 and m["ms_per_image"] > 0


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_give_one_clear_line(tmp_path, vqvae_run, vae_run, pcnn_run):
    ckpt = pcnn_run / "best.pt"
    diff = util.save_checkpoint({"kind": "diffusion", "config": {}}, tmp_path / "diff.pt")
    with pytest.raises(UserError, match="train needs --ae PATH"):
        _pc("train", "--preset", "smoke", "--out", tmp_path / "a")
    with pytest.raises(UserError, match=r"--ae \S+diff.pt: is a 'diffusion' checkpoint, expected stage1"):
        _pc("train", "--ae", diff, "--preset", "smoke", "--out", tmp_path / "b")
    with pytest.raises(UserError, match=r"--ae \S+missing.pt: no such checkpoint file"):
        _pc("train", "--ae", tmp_path / "missing.pt", "--preset", "smoke", "--out", tmp_path / "c")
    with pytest.raises(UserError, match=r"--ckpt \S+: is a 'stage1' checkpoint, expected pixelcnn"):
        _pc("sample", "--ckpt", vqvae_run / "best.pt", "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match=r"--ckpt \S+diff.pt: is a 'diffusion' checkpoint, expected pixelcnn"):
        _pc("evaluate", "--ckpt", diff)
    with pytest.raises(UserError, match=r"--z 0\.\.40: z-indices must lie in 0\.\.31"):
        _pc("sample", "--ckpt", ckpt, "--z", "0..40", "--out", tmp_path / "s.png")
    with pytest.raises(UserError, match=r"cannot change on resume: --hidden 32 \(run has 16\)"):
        _pc("train", "--resume", pcnn_run, "--hidden", 32)
    with pytest.raises(UserError, match="a run already exists there; pass --resume"):
        _pc("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--out", pcnn_run)
    with pytest.raises(UserError, match="a 'stage1' run, not a 'pixelcnn' run"):
        _pc("train", "--resume", vqvae_run)
    with pytest.raises(UserError, match="--n 0 .*at least 1"):
        _pc("sample", "--ckpt", ckpt, "--n", 0, "--out", tmp_path / "s.png")

    assert not (tmp_path / "s.png").exists()


def test_moved_stage_one_checkpoint_points_at_ae(tmp_path, pcnn_run, vqvae_run):
    ckpt = util.load_checkpoint(pcnn_run / "best.pt", kind="pixelcnn")
    ckpt["ae_path"] = str(tmp_path / "moved" / "best.pt")
    moved = util.save_checkpoint({k: v for k, v in ckpt.items() if not k.startswith("_")}, tmp_path / "prior.pt")
    with pytest.raises(UserError, match=r"--ae not given, and the stage-one checkpoint recorded in \S+prior.pt, "
                                        r"\S+moved/best.pt: no such checkpoint file"):
        _pc("sample", "--ckpt", moved, "--out", tmp_path / "s.png")
    _pc("sample", "--ckpt", moved, "--ae", vqvae_run / "best.pt", "--n", 1, "--z", "3", "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").exists()  # --ae overrides the recorded path


def test_existing_run_is_refused_before_its_codes_are_touched(tmp_path, pcnn_run, tiny_data):
    run = tmp_path / "run"
    shutil.copytree(pcnn_run, run)
    before = (run / "codes.pt").read_bytes()
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    with pytest.raises(UserError, match="a run already exists"):
        _pc("train", "--ae", util.load_checkpoint(run / "best.pt")["ae_path"], "--data", other, "--preset", "smoke",
            "--out", run)
    assert (run / "codes.pt").read_bytes() == before
    # with --overwrite and other data, the stale cache of the old data is not reused
    train_dir = other / "keras_png_slices_train"
    subject = sorted(train_dir.iterdir())[0].name.split("_slice_")[0]
    for f in train_dir.glob(f"{subject}_slice_*"):
        f.unlink()  # one subject (32 slices) fewer
    _pc("train", "--ae", util.load_checkpoint(run / "best.pt")["ae_path"], "--data", other, "--preset", "smoke",
        "--out", run, "--overwrite", "--steps", 1)
    cache = torch.load(run / "codes.pt", map_location="cpu", weights_only=True)
    assert Path(cache["data"]) == other.resolve() and len(cache["train"]) == 96


def test_cli_errors_are_one_line_without_traceback(tmp_path, vae_run, pcnn_run, cli):
    cases = [
        (["train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--out", tmp_path / "x"], "needs a VQ-VAE"),
        (["sample", "--ckpt", pcnn_run / "best.pt", "--z", "0..40", "--out", tmp_path / "s.png"], "must lie in 0..31"),
    ]
    cli.one_line_errors("pixelCNN.py", cases)


# ----------------------------------------------------------------------------------------------
# Distributed


@pytest.mark.ddp
def test_ddp_two_processes_gloo(tmp_path, vqvae_run, cli):
    records = cli.ddp_smoke_train("pixelCNN.py", vqvae_run / "best.pt", tmp_path / "ddp", "pixelcnn")
    assert [r["step"] for r in records if "loss/ce" in r] == [2, 4, 6]  # rank 0 logs alone, once per step
    assert [r["step"] for r in records if "val/bits_per_code" in r] == [3, 6]
