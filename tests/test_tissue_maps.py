"""Samples as training data: every generated slice comes with its tissue map (the segmenter of the prior's
data labels it), and train-on-synthetic / test-on-real scores what the pairs are worth to a segmenter.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_tissue_maps.py
"""
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch.nn as nn
from PIL import Image

import dataset
import evaluation
import stable_diffusion as sd
import stage_two
import util
from util import UserError

LEVELS = dataset.SEG_CLASS_LEVELS
EDGES = (-0.5, 0.0, 0.5)  # ThresholdNet: class k where the pixel lies above EDGES[k - 1]


class ThresholdNet(nn.Module):
    """A stand-in labeller with a known answer: the class of each pixel is its intensity bin (EDGES)."""

    def forward(self, x):
        k = torch.bucketize(x[:, 0].float().contiguous(), torch.tensor(EDGES))
        return nn.functional.one_hot(k, 4).permute(0, 3, 1, 2).float()


def _bins(u8):
    """ThresholdNet's classes of uint8 slices, computed independently (on the [-1, 1] values of the PNG)."""
    return np.digitize(u8.astype(np.float64) / 127.5 - 1, EDGES, right=True)


@pytest.fixture()
def fake_labeller(monkeypatch):
    monkeypatch.setattr(evaluation, "segmenter_for", lambda *a, **k: ThresholdNet())


@pytest.fixture(scope="module")
def ldm(tmp_path_factory, vqvae_run, cli):
    out = tmp_path_factory.mktemp("ldm_tissue") / "run"
    sd.main([str(a) for a in ("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--out", out,
                              *cli.CADENCE)])
    return out


def _tiles(grid, n, size, nrow, pad=2):
    """The n tiles of a `util.tile` grid, [n, size, size(, 3)]."""
    out = []
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (size + pad), pad + c * (size + pad)
        out.append(grid[y:y + size, x:x + size])
    return np.stack(out)


# ----------------------------------------------------------------------------------------------
# Figures


def test_overlay_tints_each_tissue_and_leaves_background_grey():
    images = torch.tensor([[[[-1.0, 0.0], [1.0, 0.2]]]])
    labels = np.array([[[0, 1], [2, 3]]])
    out = util.overlay(images, labels, alpha=0.5)
    gray = util.to_uint8(images)[0].astype(float)
    for (y, x), k in np.ndenumerate(labels[0]):
        expected = gray[y, x] if k == 0 else 0.5 * gray[y, x] + 0.5 * util.TISSUE_COLOURS[k]
        assert np.allclose(out[0, y, x], np.round(expected)), (y, x)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3)


def test_labelled_grids_hold_seg_levels_and_overlays_in_sample_order(tmp_path):
    rng = np.random.default_rng(0)
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    labels = rng.integers(0, 4, (5, 8, 8))
    seg, over = util.save_labelled_grids(images, labels, LEVELS, tmp_path / "s.png", nrow=3)
    assert (seg.name, over.name) == ("s_seg.png", "s_overlay.png")
    seg_tiles = _tiles(np.asarray(Image.open(seg)), 5, 8, 3)
    assert np.array_equal(seg_tiles, LEVELS[labels])  # the OASIS seg PNG convention, tile i = sample i
    over_tiles = _tiles(np.asarray(Image.open(over)), 5, 8, 3)
    assert np.array_equal(over_tiles, util.overlay(images, labels))


def test_segnet_takes_extra_input_channels():
    net = evaluation.SegNet(width=4, in_channels=3)
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 4, 16, 16)


def _segnet_by_hand(net, x):
    """SegNet's forward as plain functional calls on contiguous (NCHW) copies of its weights."""
    w = {k: v.contiguous() for k, v in net.state_dict().items()}

    def block(name, h):
        h = F.relu(F.conv2d(h, w[f"{name}.0.weight"], w[f"{name}.0.bias"], padding=1))
        return F.relu(F.conv2d(h, w[f"{name}.2.weight"], w[f"{name}.2.bias"], padding=1))
    e1 = block("enc1", x)
    e2 = block("enc2", F.max_pool2d(e1, 2))
    m = block("mid", F.max_pool2d(e2, 2))
    d2 = block("dec2", torch.cat([F.conv_transpose2d(m, w["up2.weight"], w["up2.bias"], stride=2), e2], 1))
    d1 = block("dec1", torch.cat([F.conv_transpose2d(d2, w["up1.weight"], w["up1.bias"], stride=2), e1], 1))
    return F.conv2d(d1, w["out.weight"], w["out.bias"])


def test_channels_last_segnet_equals_its_plain_layout_forward_and_gradients():
    torch.manual_seed(0)
    net = evaluation.SegNet(width=4, in_channels=2)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.dim() == 4)
    x = torch.randn(3, 2, 16, 12)
    out = net(x)
    assert torch.allclose(out, _segnet_by_hand(net, x), atol=1e-5)
    out.square().sum().backward()  # the gradients arrive in the parameters' own layout, each equal to NCHW's
    plain = {k: v.detach().contiguous().requires_grad_() for k, v in net.named_parameters()}
    ref = torch.func.functional_call(net, plain, (x,))
    grads = torch.autograd.grad(ref.square().sum(), list(plain.values()))
    for (name, p), g in zip(net.named_parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-4, rtol=1e-4), name


# ----------------------------------------------------------------------------------------------
# The labeller and the real references are trained once per dataset


def test_labeller_is_trained_once_per_dataset(tiny_data, tmp_path, monkeypatch, capsys):
    first = evaluation.segmenter_for(tiny_data, 32, steps=3, cache_dir=tmp_path)
    assert "tissue segmenter: trained on" in capsys.readouterr().out
    monkeypatch.setattr(evaluation, "train_segmenter", lambda *a, **k: pytest.fail("retrained a cached labeller"))
    again = evaluation.segmenter_for(tiny_data, 32, steps=3, cache_dir=tmp_path)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(pytest.fail.Exception):  # other steps: another labeller
        evaluation.segmenter_for(tiny_data, 32, steps=4, cache_dir=tmp_path)


def test_data_without_tissue_maps_is_one_clear_error(tmp_path, write_disc_dataset):
    root = write_disc_dataset(tmp_path / "discs")  # OASIS layout, no keras_png_slices_seg_* folders
    with pytest.raises(UserError, match="has no tissue maps for its train split"):
        evaluation.segmenter_for(root, 32, steps=2, cache_dir=tmp_path)
    with pytest.raises(UserError, match="has no tissue maps for the train and test splits"):
        evaluation.segmentation_reference(root, 32, steps=2, cache_dir=tmp_path)


def test_synthetic_row_equals_real_row_when_the_pairs_are_the_same(tiny_data, tmp_path):
    """Same network, steps and seed on both sides: fed the very pairs the real reference trains on, the
    synthetic row must score exactly the real one."""
    train = dataset.load_split(tiny_data, "train", size=32, labels=True)
    images, _ = train.tensors()
    pick = evaluation._pick(len(images), 40, np.random.default_rng(3))
    fake = util.to_float(images[pick])
    m = evaluation.train_on_synthetic(fake, torch.from_numpy(train.labels[pick]), tiny_data, steps=4, seed=3,
                                      cache_dir=tmp_path)
    for key in ("dice/CSF", "dice/grey matter", "dice/white matter", "dice_mean"):
        assert m[f"segmenter_synthetic/{key}"] == m[f"segmenter_real/{key}"]
        assert 0 <= m[f"segmenter_2_subjects_plus_synthetic/{key}"] <= 1
    assert m["segmenter_train_pairs"] == m["segmenter_synthetic_pairs"] == 40
    assert m["segmenter_two_subject_pairs"] == 2 * train.num_z
    assert m["tstr_ratio"] == pytest.approx(1.0)


def test_real_reference_is_reused_from_its_cache(tiny_data, tmp_path, monkeypatch):
    first = evaluation.segmentation_reference(tiny_data, 32, n=20, steps=3, cache_dir=tmp_path)
    monkeypatch.setattr(evaluation, "train_segmenter", lambda *a, **k: pytest.fail("recomputed a cached reference"))
    assert evaluation.segmentation_reference(tiny_data, 32, n=20, steps=3, cache_dir=tmp_path) == first


# ----------------------------------------------------------------------------------------------
# sample and evaluate


def test_sample_writes_each_slice_tissue_map(ldm, tmp_path, fake_labeller, capsys):
    out = tmp_path / "s.png"
    sd.main(["sample", "--ckpt", str(ldm / "best.pt"), "--z", "0,2,4", "--n", "2", "--sampler", "ddim",
             "--steps", "3", "--out", str(out)])
    assert "tissue maps (OASIS seg levels 0/85/170/255) ->" in capsys.readouterr().out
    samples = _tiles(np.asarray(Image.open(out)), 6, 32, 3)
    seg = _tiles(np.asarray(Image.open(tmp_path / "s_seg.png")), 6, 32, 3)
    assert set(np.unique(seg)) <= set(LEVELS.tolist())
    # the map of each tile is the labeller's answer for that tile (up to the PNG's rounding at bin edges)
    assert (np.searchsorted(LEVELS, seg) == _bins(samples)).mean() > 0.99
    assert Image.open(tmp_path / "s_overlay.png").mode == "RGB"


def test_no_tissue_maps_flag_writes_the_grid_alone(ldm, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "segmenter_for", lambda *a, **k: pytest.fail("labelled with --no-tissue-maps"))
    sd.main(["sample", "--ckpt", str(ldm / "best.pt"), "--z", "0", "--sampler", "ddim", "--steps", "2",
             "--no-tissue-maps", "--out", str(tmp_path / "s.png")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]


def test_unlabelled_data_gets_a_note_and_no_maps(ldm, tmp_path, monkeypatch, capsys):
    def none(*a, **k):
        raise UserError("/data/x: has no tissue maps for the train and test splits")
    monkeypatch.setattr(evaluation, "segmenter_for", none)
    sd.main(["sample", "--ckpt", str(ldm / "best.pt"), "--z", "0", "--sampler", "ddim", "--steps", "2",
             "--out", str(tmp_path / "s.png")])
    assert "note: no tissue maps written: /data/x: has no tissue maps" in capsys.readouterr().out
    assert not (tmp_path / "s_seg.png").exists()


def test_tstr_on_data_without_tissue_maps_is_refused_before_a_sample_is_drawn(ldm, tmp_path, monkeypatch):
    def none(*a, **k):
        raise UserError("/data/x: has no tissue maps for its train split")
    monkeypatch.setattr(evaluation, "segmenter_for", none)
    monkeypatch.setattr(stage_two, "generate_stacks", lambda *a, **k: pytest.fail("sampled before the refusal"))
    with pytest.raises(UserError, match=r"^--tstr 2: needs tissue maps for the samples \(/data/x: has no tissue"):
        sd.main(["evaluate", "--ckpt", str(ldm / "best.pt"), "--n", "1", "--sampler", "ddim", "--steps", "2",
                 "--tstr", "2", "--out", str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def test_subjects_come_with_label_volumes_that_read_back(ldm, tmp_path, fake_labeller):
    out = tmp_path / "subj"
    sd.main(["sample", "--ckpt", str(ldm / "best.pt"), "--subjects", "2", "--sampler", "ddim", "--steps", "2",
             "--out", str(out)])
    for i in range(2):
        image = np.asarray(nib.load(out / f"subject_{i:03d}.nii.gz").dataobj)
        labels = np.asarray(nib.load(out / f"subject_{i:03d}{dataset.LABEL_SUFFIX}.nii.gz").dataobj)
        assert labels.shape == image.shape and labels.dtype == np.uint8
        assert (labels == _bins(image)).mean() > 0.99  # voxel for voxel the map of that image
    assert (out / "subjects_seg.png").is_file()
    # the folder is a labelled NIfTI dataset: dataset.py pairs NAME_seg.nii.gz with NAME.nii.gz
    sets = dataset.load_splits(out, size=32, labels=True, splits=("train",))
    assert sets["train"].labels is not None and sets["train"].labels.shape == sets["train"].images.shape


def test_evaluate_tstr_reports_every_row(ldm, tiny_data, tmp_path, quick_eval, monkeypatch):
    monkeypatch.setattr(evaluation, "SEG_STEPS", 3)  # the labeller, trained in the quick_eval cache
    out = tmp_path / "m.json"
    sd.main(["evaluate", "--ckpt", str(ldm / "best.pt"), "--n", "2", "--sampler", "ddim", "--steps", "2",
             "--tstr", "3", "--out", str(out)])
    m = json.loads(out.read_text())
    for row in ("real", "real_2_subjects", "synthetic", "2_subjects_plus_synthetic"):
        assert 0 <= m[f"segmenter_{row}/dice_mean"] <= 1, row
    num_z = dataset.load_split(tiny_data, "train", size=32).num_z
    assert m["segmenter_synthetic_pairs"] == m["segmenter_train_pairs"] == 2 * num_z  # 2 subjects, as many real
    real = m["segmenter_real/dice_mean"]
    assert m["tstr_ratio"] == (pytest.approx(m["segmenter_synthetic/dice_mean"] / real) if real > 0 else None)


def test_evaluate_tstr_without_the_two_subject_rows(ldm, tmp_path, quick_eval, monkeypatch):
    monkeypatch.setattr(evaluation, "SEG_STEPS", 3)
    trained = []
    real_dice = evaluation._test_dice
    monkeypatch.setattr(evaluation, "_test_dice", lambda x, *a: trained.append(len(x)) or real_dice(x, *a))
    out = tmp_path / "m.json"
    sd.main(["evaluate", "--ckpt", str(ldm / "best.pt"), "--n", "2", "--sampler", "ddim", "--steps", "2",
             "--tstr", "3", "--no-tstr-two-subjects", "--out", str(out)])
    m = json.loads(out.read_text())
    assert trained == [m["segmenter_train_pairs"], m["segmenter_synthetic_pairs"]]  # two trainings, not four
    assert not [k for k in m if "2_subjects" in k or "two_subject" in k]
    real = m["segmenter_real/dice_mean"]
    assert m["tstr_ratio"] == (pytest.approx(m["segmenter_synthetic/dice_mean"] / real) if real > 0 else None)


@pytest.mark.parametrize("argv,needles", [
    (["--tstr", "-1"], ["--tstr -1: steps must be 0 (skip) or more"]),
    (["--no-tstr-two-subjects"], ["--no-tstr-two-subjects: applies only with --tstr STEPS"]),
    (["--tstr", "2", "--no-tissue-maps"], ["--tstr 2: needs tissue maps for the samples"]),
])
def test_bad_tstr_flags_are_one_line(ldm, cli, argv, needles):
    proc = cli.run("stable_diffusion.py", "evaluate", "--ckpt", ldm / "best.pt", "--n", "1", "--sampler", "ddim",
                   "--steps", "2", *argv)
    cli.assert_one_line_error(proc, *needles)


def test_tissue_maps_of_decoded_slices_match_segment(tiny_data, tmp_path, monkeypatch):
    """stage_two.tissue_maps is the labeller's argmax, as uint8 classes."""
    net = evaluation.segmenter_for(tiny_data, 32, steps=2, cache_dir=tmp_path)
    monkeypatch.setattr(evaluation, "segmenter_for", lambda *a, **k: net)
    images = torch.rand(3, 1, 32, 32) * 2 - 1

    class Args:
        tissue_maps = True
    maps = stage_two.tissue_maps(images, {"data": str(tiny_data)}, Args)
    assert maps.dtype == np.uint8 and np.array_equal(maps, net(images).argmax(1).numpy())


def test_two_subjects_plus_synthetic_trains_on_half_real_batches(tiny_data, tmp_path, monkeypatch):
    train = dataset.load_split(tiny_data, "train", size=32, labels=True)
    seen = []

    def spy(x, y, test, steps, seed):
        seen.append((x.clone(), y.clone()))
        return evaluation.dice_scores(y[:1], y[:1])
    monkeypatch.setattr(evaluation, "_test_dice", spy)
    fake = torch.full((5 * 2 * train.num_z, 1, 32, 32), 0.25)  # 5x as many synthetic as 2 subjects' slices
    evaluation.train_on_synthetic(fake, torch.zeros(len(fake), 32, 32, dtype=torch.long), tiny_data, steps=2,
                                  cache_dir=tmp_path)
    x, y = seen[-1]  # rows: real, 2 subjects, synthetic, 2 subjects + synthetic
    real = x[:-len(fake)]
    assert len(real) == len(fake) and torch.equal(x[-len(fake):], fake)
    two = evaluation._two_subjects(train)
    images, _ = train.tensors()
    assert torch.equal(real, util.to_float(images[two]).repeat(5, 1, 1, 1))  # each real pair 5 times
    assert torch.equal(y[:len(real)], torch.from_numpy(train.labels[two]).long().repeat(5, 1, 1))
