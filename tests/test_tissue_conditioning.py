"""Generation from a given tissue map: a diffusion UNet trained with --tissue sees each slice's map (its
one-hot classes folded onto the latent grid) and `sample --labels MAP` draws anatomy that follows it; evaluate
reports how closely (Dice of the labeller's segmentation of each sample against its map).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_tissue_conditioning.py
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import evaluation
import stable_diffusion as sd
import stage_two
import util
from dataset import DataError
from model_diffusion import ContextGuided, LatentUNet
from util import UserError

CPU = torch.device("cpu")
LEVELS = dataset.SEG_CLASS_LEVELS


def _sd(*argv):
    return sd.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def ldm_tissue(tmp_path_factory, vqvae_run, cli):
    """A smoke latent-diffusion run conditioned on tissue maps (and, by default, on a neighbour)."""
    out = tmp_path_factory.mktemp("ldm_tissue_cond") / "run"
    _sd("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--tissue", "--out", out, *cli.CADENCE)
    return out


def _map_png(path, classes, levels=True):
    Image.fromarray((LEVELS[classes] if levels else classes).astype(np.uint8)).save(path)
    return path


def test_tissue_grid_folds_each_pixel_class_onto_the_latent_grid():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (3, 16, 16))
    grid = stage_two.tissue_grid(labels, 4).numpy()
    f = 4  # 16 px onto 4 cells
    assert grid.shape == (3, 4 * f * f, 4, 4) == (3, stage_two.tissue_channels(16, 4), 4, 4)
    for n, y, x in [(0, 0, 0), (1, 7, 13), (2, 15, 15), (2, 4, 9)]:
        k, (i, dy), (j, dx) = labels[n, y, x], divmod(y, f), divmod(x, f)
        cell = grid[n, :, i, j].reshape(4, f, f)  # channel c * f^2 + dy * f + dx (pixel_unshuffle's order)
        assert cell[k, dy, dx] == 1 and cell[:, dy, dx].sum() == 1
    # averaged over each cell's pixels it is the class fraction per cell
    block = labels[1, 8:12, 4:8]
    assert grid[1].reshape(4, f * f, 4, 4).mean(1)[2, 2, 1] == pytest.approx((block == 2).mean())


def test_read_label_map_takes_seg_levels_or_classes(tmp_path):
    classes = np.random.default_rng(1).integers(0, 4, (20, 30)).astype(np.uint8)
    padded = np.zeros((30, 30), np.uint8)
    padded[5:25] = classes  # zero-padded to a centred square, as slices are
    for levels in (True, False):
        got = dataset.read_label_map(_map_png(tmp_path / f"m{levels}.png", classes, levels))
        assert np.array_equal(got, padded)
    assert dataset.read_label_map(tmp_path / "mTrue.png", 60).shape == (60, 60)


def test_bad_label_maps_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.png: no such tissue map"):
        dataset.read_label_map(tmp_path / "nope.png")
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match=r"odd\.png: holds levels 100; an OASIS seg map has only 0, 85, 170, 255"):
        dataset.read_label_map(tmp_path / "odd.png")


def test_training_caches_and_shows_each_slice_map(ldm_tissue, tiny_data):
    cache = torch.load(ldm_tissue / "latents.pt", map_location="cpu", weights_only=True)
    train = dataset.load_split(tiny_data, "train", size=32, labels=True)
    h = cache["train"].shape[-1]
    assert torch.equal(cache["train_tissue"], torch.from_numpy(train.labels))
    model, _, ckpt = stage_two.load_prior(sd.PRIOR, ldm_tissue / "best.pt", CPU)
    c = ckpt["config"]["latent_shape"][0]
    assert ckpt["config"]["image_size"] == 32
    assert model.context_channels == (c + 1) + 4 * (32 // h) ** 2  # the neighbour part, then the folded map


def test_tissue_drop_hides_whole_maps(ldm_tissue, vqvae_run, tiny_data):
    model, ae, ckpt = stage_two.load_prior(sd.PRIOR, ldm_tissue / "best.pt", CPU)
    cache = torch.load(ldm_tissue / "latents.pt", map_location="cpu", weights_only=True)
    task = sd.DiffusionTask(sd.PRIOR, {**ckpt["config"], "p_tissue_drop": 0.5}, CPU, ae, cache)
    tissue = cache["train_tissue"][:64]
    ctx = task.context("train", cache["train_below"][:64], cache["train_above"][:64], tissue,
                       torch.Generator().manual_seed(0))
    maps = stage_two.tissue_grid(tissue, cache["train"].shape[-1])
    part = ctx[:, -maps.shape[1]:]
    shown = part.flatten(1).abs().sum(1) > 0
    assert torch.equal(part[shown], maps[shown]) and 10 < int(shown.sum()) < 54  # each map whole, or none


def test_sample_labels_reaches_the_unet_and_reports_dice(ldm_tissue, tiny_data, tmp_path, monkeypatch, capsys):
    test = dataset.load_split(tiny_data, "test", size=32, labels=True)
    path = _map_png(tmp_path / "map.png", test.labels[5])
    seen = []
    forward = LatentUNet.forward

    def spy(self, x_t, t, z=None, context=None):
        seen.append(context[:, -4 * (32 // x_t.shape[-1]) ** 2:].clone())
        return forward(self, x_t, t, z, context)
    monkeypatch.setattr(LatentUNet, "forward", spy)
    net = evaluation.segmenter_for(tiny_data, 32, steps=2, cache_dir=tmp_path)
    monkeypatch.setattr(evaluation, "segmenter_for", lambda *a, **k: net)
    _sd("sample", "--ckpt", ldm_tissue / "best.pt", "--labels", path, "--z", int(test.z[5]), "--n", 2,
        "--steps", 2, "--out", tmp_path / "s.png")
    expected = stage_two.tissue_grid(test.labels[5][None], seen[0].shape[-1])
    for c in seen:  # tissue guidance (default 2): the map, then the same batch with it hidden
        shown, hidden = c.chunk(2)
        assert torch.equal(shown, expected.expand_as(shown)) and not hidden.any()
    out = capsys.readouterr().out
    printed = float(out.split("the samples follow --labels")[1].split("(mean ")[1].split(")")[0])
    # the Dice printed is that of the samples' maps (as written to s_seg.png) against the given map
    seg = np.asarray(Image.open(tmp_path / "s_seg.png"))
    tiles = np.stack([seg[2 + 34 * i:34 + 34 * i, 2:34] for i in range(2)])  # --z one value: a sample per row
    got = evaluation.dice_scores(torch.from_numpy(np.searchsorted(LEVELS, tiles)),
                                 torch.from_numpy(test.labels[5]).expand(2, -1, -1))
    assert printed == pytest.approx(got["dice_mean"], abs=5e-4)


def test_sample_without_labels_shows_no_map(ldm_tissue, tmp_path, monkeypatch):
    seen = []
    forward = LatentUNet.forward

    def spy(self, x_t, t, z=None, context=None):
        seen.append(context[:, -4 * (32 // x_t.shape[-1]) ** 2:].abs().sum().item())
        return forward(self, x_t, t, z, context)
    monkeypatch.setattr(LatentUNet, "forward", spy)
    _sd("sample", "--ckpt", ldm_tissue / "best.pt", "--z", "0,3", "--steps", 2, "--no-tissue-maps",
        "--out", tmp_path / "s.png")
    assert seen and set(seen) == {0.0}  # zeros: a map hidden, as in training


def test_evaluate_reports_how_samples_follow_test_maps(ldm_tissue, tiny_data, tmp_path, quick_eval, monkeypatch):
    monkeypatch.setattr(evaluation, "SEG_STEPS", 3)
    _sd("evaluate", "--ckpt", ldm_tissue / "best.pt", "--n", 1, "--steps", 2, "--out", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    test = dataset.load_split(tiny_data, "test", size=32, labels=True)
    assert m["follow_slices"] == len(test.images)
    labeller = evaluation.segmenter_for(tiny_data, 32)  # the cached one evaluate used
    images, _ = test.tensors()
    real = evaluation.dice_scores(evaluation.segment(labeller, images), torch.from_numpy(test.labels))
    assert m["follow_real/dice_mean"] == pytest.approx(real["dice_mean"])
    assert 0 <= m["follow/dice_mean"] <= 1


def test_config_without_tissue_loads_as_a_prior_without_it(ldm_tissue, vqvae_run, tmp_path, cli):
    plain = tmp_path / "plain"
    _sd("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--out", plain, *cli.CADENCE)
    state = torch.load(plain / "best.pt", map_location="cpu", weights_only=True)
    for key in ("tissue", "p_tissue_drop"):
        state["config"].pop(key)  # a checkpoint from before tissue conditioning
    util.save_checkpoint(state, tmp_path / "old.pt")
    model, _, ckpt = stage_two.load_prior(sd.PRIOR, tmp_path / "old.pt", CPU)
    assert model.context_channels == ckpt["config"]["latent_shape"][0] + 1
    with pytest.raises(UserError, match="this model was trained without tissue maps; train one with --tissue"):
        _sd("sample", "--ckpt", tmp_path / "old.pt", "--labels", tmp_path / "x.png", "--out", tmp_path / "s.png")


def test_bad_tissue_flags_give_one_clear_line(ldm_tissue, vqvae_run, tmp_path, cli, write_disc_dataset):
    discs = write_disc_dataset(tmp_path / "discs")  # no seg maps
    proc = cli.run("stable_diffusion.py", "train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--tissue",
                   "--data", discs, "--out", tmp_path / "r")
    cli.assert_one_line_error(proc, "--tissue:", "has no tissue maps for its train and validate splits")
    for p in ("0", "1"):
        proc = cli.run("stable_diffusion.py", "train", "--ae", vqvae_run / "best.pt", "--preset", "smoke",
                       "--tissue", "--p-tissue-drop", p, "--out", tmp_path / f"p{p}")
        cli.assert_one_line_error(proc, f"--p-tissue-drop {float(p)}: must lie strictly between 0 and 1")
        assert not (tmp_path / f"p{p}").exists()
    ckpt = ldm_tissue / "best.pt"
    proc = cli.run("stable_diffusion.py", "sample", "--ckpt", ckpt, "--labels", tmp_path / "missing.png")
    cli.assert_one_line_error(proc, "missing.png: no such tissue map")
    proc = cli.run("stable_diffusion.py", "sample", "--ckpt", ckpt, "--subjects", 1, "--labels", tmp_path / "m.png",
                   "--out", tmp_path / "subj")
    cli.assert_one_line_error(proc, "--labels: does not apply with --subjects")


def test_context_guidance_mixes_the_shown_and_hidden_map_outputs():
    torch.manual_seed(0)
    net = LatentUNet(in_channels=2, resolution=8, num_z=4, model_channels=8, channel_mult=[1], num_res_blocks=1,
                     attn_resolutions=[], heads=1, context_channels=5).eval()
    with torch.no_grad():
        for p in net.parameters():  # zero-initialised output layers would make every branch equal
            p.add_(0.05 * torch.randn_like(p))
    x, t, z = torch.randn(3, 2, 8, 8), torch.tensor([5, 50, 500]), torch.tensor([0, 1, 3])
    context = torch.randn(3, 5, 8, 8)
    hidden = context.clone()
    hidden[:, -3:] = 0
    with torch.no_grad():
        c, u = net(x, t, z, context=context), net(x, t, z, context=hidden)
        out = ContextGuided(net, 2.5, 3)(x, t, z, context=context)
        plain = ContextGuided(net, 1.0, 3)(x, t, z, context=context)
    assert torch.allclose(out, u + 2.5 * (c - u), atol=1e-5)
    assert torch.allclose(plain, c, atol=1e-5) and not torch.allclose(c, u, atol=1e-3)


def test_tissue_guidance_is_recorded_and_refused_where_it_cannot_apply(ldm_tissue, vqvae_run, tmp_path, cli,
                                                                         quick_eval, monkeypatch):
    monkeypatch.setattr(evaluation, "SEG_STEPS", 3)
    for extra, expected in (([], sd.TISSUE_GUIDANCE), (["--tissue-guidance", "1"], 1.0)):
        _sd("evaluate", "--ckpt", ldm_tissue / "best.pt", "--n", 1, "--steps", 2, *extra, "--out", tmp_path / "m.json")
        assert json.loads((tmp_path / "m.json").read_text())["tissue_guidance"] == expected
    proc = cli.run("stable_diffusion.py", "sample", "--ckpt", ldm_tissue / "best.pt", "--tissue-guidance", "inf")
    cli.assert_one_line_error(proc, "--tissue-guidance inf: must be a finite number >= 0")
    plain = tmp_path / "plain"
    _sd("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--out", plain, *cli.CADENCE)
    proc = cli.run("stable_diffusion.py", "sample", "--ckpt", plain / "best.pt", "--tissue-guidance", "2")
    cli.assert_one_line_error(proc, "--tissue-guidance 2.0: this model was trained without tissue maps")
