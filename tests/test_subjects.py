"""Whole synthetic subjects: neighbour lookup and stacks in dataset.py, the NIfTI volume writer (round trip through
nibabel and dataset.py), neighbour conditioning of the diffusion UNet, chained drawing, the consistency metrics,
and `sample --subjects` / `evaluate` with their bad inputs.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_subjects.py
"""
import argparse
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import evaluation
import pixelCNN
import stable_diffusion as sd
import stage_two
import trainer as tr
import util
from model_diffusion import LatentUNet, NoiseSchedule, guided, neighbour_context, pick_neighbours
from util import UserError

CPU = torch.device("cpu")


def _sd(*argv):
    return sd.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def train_set(tiny_data):
    return dataset.load_split(tiny_data, "train", size=32)


@pytest.fixture(scope="session")
def ldm_either(tmp_path_factory, vqvae_run, cli):
    """A smoke latent-diffusion run with neighbour conditioning (the default) on the smoke VQ-VAE."""
    out = tmp_path_factory.mktemp("ldm_either") / "run"
    _sd("train", "--ae", vqvae_run / "best.pt", "--preset", "smoke", "--out", out, *cli.CADENCE)
    return out


@pytest.fixture(scope="session")
def ldm_alone(tmp_path_factory, vae_run, cli):
    """A smoke latent-diffusion run without neighbour conditioning (each slice alone)."""
    out = tmp_path_factory.mktemp("ldm_alone") / "run"
    _sd("train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--neighbours", "none", "--out", out,
        *cli.CADENCE)
    return out


# ----------------------------------------------------------------------------------------------
# dataset.py: neighbours, stacks, volumes


def test_neighbours_point_at_the_same_subjects_next_slice(train_set):
    below, above = train_set.neighbours()
    subjects, z = np.array(train_set.subjects), train_set.z
    for side, step in ((below, -1), (above, 1)):
        has = side.numpy() >= 0
        idx = side.numpy()[has]
        assert (subjects[idx] == subjects[has]).all() and (z[idx] == z[has] + step).all()
    n_subjects = len(set(train_set.subjects))
    assert (below < 0).sum() == n_subjects and (above < 0).sum() == n_subjects  # one end of each stack
    assert set(z[(below < 0).numpy()]) == {0} and set(z[(above < 0).numpy()]) == {31}


def test_stacks_hold_each_subject_in_z_order(train_set):
    stacks, subjects = train_set.stacks()
    assert stacks.shape == (len(set(train_set.subjects)), 32, 32, 32) and stacks.dtype == np.uint8
    for s, subject in enumerate(subjects):
        for k in (0, 13, 31):
            i = [j for j, (sub, zz) in enumerate(zip(train_set.subjects, train_set.z)) if sub == subject and zz == k]
            assert np.array_equal(stacks[s, k], train_set.images[i[0]])


def test_write_volume_round_trips_through_nibabel_and_dataset(train_set, tmp_path):
    stacks, _ = train_set.stacks()
    spacing = (2.0, 2.0, 3.0)
    folder = tmp_path / "nifti"
    folder.mkdir()
    for s in range(3):  # the NIfTI loader splits subjects three ways
        dataset.write_volume(stacks[s], folder / f"subject_{s:03d}.nii.gz", spacing)
    img = nib.load(folder / "subject_000.nii.gz")
    assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.uint8
    assert np.allclose(img.header.get_zooms(), spacing) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = np.asarray(img.dataobj)
    assert np.array_equal(data[:, :, 5], stacks[0, 5, ::-1, :].T)  # x = column, y = row flipped (anterior up)
    loaded = dataset.load_splits(folder, size=32)
    back = {}
    for split in loaded.values():
        st, subjects = split.stacks()
        back.update(zip(subjects, st))
    assert len(back) == 3
    for s in range(3):
        got = next(v for k, v in back.items() if k.endswith(f"subject_{s:03d}"))
        def corr(a):
            return np.corrcoef(got.astype(float).ravel(), a.astype(float).ravel())[0, 1]
        assert corr(stacks[s]) > 0.99, (s, corr(stacks[s]))  # intensities re-scaled by percentiles; geometry exact
        for flipped in (stacks[s][::-1], stacks[s][:, ::-1], stacks[s][:, :, ::-1]):  # z, rows, columns
            assert corr(flipped) < corr(stacks[s]) - 0.005  # a flip the symmetric template would hide shows
    assert dataset.voxel_spacing(folder, 32)[0] == pytest.approx((2.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="expected uint8 slices"):
        dataset.write_volume(stacks[0].astype(np.float32), tmp_path / "x.nii.gz", spacing)


def test_voxel_spacing_of_the_embedded_set_and_png_folders(tiny_data, tmp_path):
    (sx, sy, sz), how = dataset.voxel_spacing(tiny_data, 32)
    assert sx == sy and sx > 5 and 0.5 < sz / sx < 3 and "embedded" in how
    png = tmp_path / "png"
    png.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png / "a.png")
    assert dataset.voxel_spacing(png, 64)[0] == (4.0, 4.0, 4.0)  # 1 mm at 256 pixels, assumed


# ----------------------------------------------------------------------------------------------
# Neighbour conditioning


def test_pick_neighbours_takes_the_side_the_mode_allows():
    below = torch.tensor([-1, 0, 1, 2, -1])
    above = torch.tensor([1, 2, 3, -1, -1])
    side, index = pick_neighbours(below, above, "below", 0.0)
    assert side.tolist() == [0, 1, 1, 1, 0] and index[side > 0].tolist() == [0, 1, 2]
    side, index = pick_neighbours(below, above, "either", 0.0, torch.Generator().manual_seed(0))
    assert side[0] == -1 and index[0] == 1 and side[3] == 1 and index[3] == 2 and side[4] == 0  # the ends
    assert pick_neighbours(below, above, "either", 1.0)[0].abs().sum() == 0  # all dropped
    many_b, many_a = torch.arange(10000), torch.arange(10000) + 1
    side, _ = pick_neighbours(many_b, many_a, "either", 0.2, torch.Generator().manual_seed(1))
    assert abs((side == 0).float().mean() - 0.2) < 0.02 and abs((side == -1).float().mean() - 0.4) < 0.02
    with pytest.raises(ValueError, match="unknown neighbour mode"):
        pick_neighbours(below, above, "none", 0.0)


def test_neighbour_context_zeroes_absent_neighbours():
    latent = torch.randn(3, 4, 8, 8)
    ctx = neighbour_context(latent, torch.tensor([1, 0, -1]))
    assert ctx.shape == (3, 5, 8, 8)
    assert torch.equal(ctx[0, :4], latent[0]) and torch.equal(ctx[2, :4], latent[2]) and not ctx[1].any()
    assert ctx[0, 4].eq(1).all() and ctx[2, 4].eq(-1).all()


def _unet(context_channels):
    torch.manual_seed(0)
    return LatentUNet(4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                      resolution=8, num_z=32, heads=2, context_channels=context_channels).eval()


def test_unet_context_changes_the_output_and_none_means_zeros():
    net = _unet(5)
    with torch.no_grad():  # the zero-initialised last conv would hide the context: give it weights
        net.conv_out.weight.normal_(0, 0.1)
    x, t, z = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 4])
    ctx = neighbour_context(torch.randn(2, 4, 8, 8), torch.tensor([1, -1]))
    with torch.no_grad():
        with_ctx, without = net(x, t, z, context=ctx), net(x, t, z)
        assert torch.equal(without, net(x, t, z, context=torch.zeros_like(ctx)))
    assert not torch.allclose(with_ctx, without)
    assert net.config["context_channels"] == 5 and net.conv_in.in_channels == 4 + 5
    with pytest.raises(ValueError, match="without context channels"):
        _unet(0)(x, t, z, context=ctx)


def test_guidance_passes_the_context_to_both_branches():
    net = _unet(5)
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.1)
    x, t, z = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 4])
    ctx = neighbour_context(torch.randn(2, 4, 8, 8), torch.tensor([1, 0]))
    with torch.no_grad():
        got = guided(net, 2.0, "eps", context=ctx)(x, t, z)
        cond, uncond = net(x, t, z, context=ctx), net(x, t, torch.full_like(z, -1), context=ctx)
    assert torch.allclose(got, uncond + 2.0 * (cond - uncond), atol=1e-5)


@pytest.mark.parametrize("order,start", [("bottom-up", 0), ("middle-out", 16)])
def test_draw_chain_conditions_each_slice_on_the_one_drawn_before(monkeypatch, order, start):
    calls = []

    def fake_draw(model, config, z, generator, guidance, options, callback=None, context=None):
        calls.append((int(z[0]), None if context is None else context[0, -1, 0, 0].item(),
                      None if context is None else context[0, 0, 0, 0].item()))
        return torch.full((len(z), 1, 2, 2), float(z[0]) + 100)  # the latent of slice k holds k + 100

    monkeypatch.setattr(sd.PRIOR, "draw", fake_draw)
    model = torch.nn.Linear(1, 1)
    stacks = sd.PRIOR.draw_chain(model, {"num_z": 32}, 2, None, 1.0, {}, order, snap=lambda x: x)
    assert stacks.shape == (2, 32, 1, 2, 2) and torch.equal(stacks[:, :, 0, 0, 0][0], torch.arange(32.0) + 100)
    assert calls[0] == (start, None, None) and len(calls) == 32
    for k, side, seen in calls[1:]:
        expected = (k - 1, 1.0) if k > start else (k + 1, -1.0)  # below known going up, above going down
        assert (seen, side) == (expected[0] + 100, expected[1]), (k, side, seen)
    assert [k for k, *_ in calls] == list(range(start, 32)) + list(range(start - 1, -1, -1))


def test_stack_order_checks_the_flags():
    ns = argparse.Namespace
    either, below, none = ({"neighbours": m} for m in ("either", "below", "none"))
    assert stage_two.stack_order(sd.PRIOR, either, ns(independent=False, order=None)) == "middle-out"
    assert stage_two.stack_order(sd.PRIOR, either, ns(independent=False, order="bottom-up")) == "bottom-up"
    assert stage_two.stack_order(sd.PRIOR, below, ns(independent=False, order=None)) == "bottom-up"
    assert stage_two.stack_order(sd.PRIOR, either, ns(independent=True, order=None)) is None
    assert stage_two.stack_order(sd.PRIOR, none, ns(independent=False, order=None)) is None
    with pytest.raises(UserError, match="--order middle-out: this latent diffusion model draws subjects bottom-up"):
        stage_two.stack_order(sd.PRIOR, below, ns(independent=False, order="middle-out"))
    with pytest.raises(UserError, match="--order bottom-up: does not apply with --independent"):
        stage_two.stack_order(sd.PRIOR, either, ns(independent=True, order="bottom-up"))
    with pytest.raises(UserError, match="--order bottom-up: this latent diffusion model draws every slice alone "
                                        r"\(trained with --neighbours none;"):
        stage_two.stack_order(sd.PRIOR, none, ns(independent=False, order="bottom-up"))


# ----------------------------------------------------------------------------------------------
# Consistency metrics


def test_outline_jitter_counts_second_differences_of_the_edges():
    k, length = 6, 20
    planes = -torch.ones(1, k, length)
    for z in range(k):  # front edge zig-zags 5, 6, 5, 6 ...; back edge fixed at 14
        planes[0, z, 5 + z % 2: 15] = 1.0
    # front: |second difference| = 2 at each of the 4 inner steps; back: 0 -> mean 1
    assert evaluation.outline_jitter(planes) == pytest.approx(1.0)
    planes[0, :, :] = -1.0
    planes[0, :, 3:9] = 1.0
    assert evaluation.outline_jitter(planes) == 0.0
    assert evaluation.outline_jitter(-torch.ones(1, k, length)) is None  # no brain anywhere


class _IndexRegressor(torch.nn.Module):
    """A stand-in z regressor: predicts 31 x (mean intensity + 1) / 2."""
    num_z = 32

    def forward(self, x):
        return (x.mean(dim=(1, 2, 3)) + 1) / 2 * 31


def test_stack_consistency_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    k = 32
    stacks = torch.linspace(-1, 1, k).view(1, k, 1, 1).expand(2, k, 16, 16).clone()
    stacks = (stacks + 0.01 * torch.randn(stacks.shape, generator=g)).clamp(-1, 1)  # as the metric sees them
    m = evaluation.stack_consistency(stacks, _IndexRegressor())
    a, b = stacks[:, :-1].reshape(-1, 1, 16, 16), stacks[:, 1:].reshape(-1, 1, 16, 16)
    assert m["adjacent_ssim"] == pytest.approx(util.ssim(a, b).mean().item())
    assert m["adjacent_l1"] == pytest.approx((a - b).abs().mean().item() / 2)
    assert m["z_monotone"] == 1.0 and m["z_spacing"] == pytest.approx(1.0, abs=0.01)
    shuffled = stacks[:, torch.randperm(k, generator=g)]
    m2 = evaluation.stack_consistency(shuffled, _IndexRegressor())
    assert m2["z_monotone"] < 0.8 and m2["adjacent_l1"] > 5 * m["adjacent_l1"]
    pred = _IndexRegressor()(shuffled.reshape(-1, 1, 16, 16)).clamp(0, 31).reshape(2, k).numpy()
    slopes = [np.polyfit(np.arange(k), p, 1)[0] for p in pred]  # least squares, independently
    assert m2["z_spacing"] == pytest.approx(np.mean(slopes), abs=1e-4)
    assert "z_monotone" not in evaluation.stack_consistency(stacks)
    with pytest.raises(ValueError, match="expected stacks"):
        evaluation.stack_consistency(stacks[:, :2])


# ----------------------------------------------------------------------------------------------
# sample --subjects, evaluate


def test_sample_subjects_writes_volumes_and_sheet(ldm_either, tmp_path, capsys):
    out = tmp_path / "subjects"
    _sd("sample", "--ckpt", ldm_either / "best.pt", "--subjects", 3, "--steps", 3, "--out", out)
    config = util.load_checkpoint(ldm_either / "best.pt", kind="diffusion")["config"]
    assert "3 subjects x 32 slices (drawn middle-out" in capsys.readouterr().out
    img = nib.load(out / "subject_000.nii.gz")
    assert img.shape == (32, 32, 32) and np.allclose(img.header.get_zooms(), config["spacing"])
    assert config["spacing"] == pytest.approx(list(dataset.voxel_spacing(config["data"], 32)[0]))
    loaded = dataset.load_splits(out, size=32)  # a NIfTI folder of three subjects
    assert sum(len(s.stacks()[1]) for s in loaded.values()) == 3
    sheet = Image.open(out / "subjects.png")
    assert sheet.size[1] == 3 * (32 + 2) + 2  # a row per subject
    first = np.asarray(img.dataobj)
    _sd("sample", "--ckpt", ldm_either / "best.pt", "--subjects", 3, "--steps", 3, "--out", tmp_path / "again")
    assert np.array_equal(np.asarray(nib.load(tmp_path / "again" / "subject_000.nii.gz").dataobj), first)  # seeded


@pytest.mark.parametrize("extra", [[], ["--independent"]])
def test_chained_subjects_reach_the_unet_with_their_neighbour(ldm_either, tmp_path, monkeypatch, extra):
    seen = set()  # (z, side of the neighbour) of every UNet call
    forward = LatentUNet.forward

    def spy(self, x_t, t, z=None, context=None):
        sides = torch.zeros(len(x_t)) if context is None else context[:, -1, 0, 0]
        seen.update(zip(z.tolist(), sides.tolist()))
        return forward(self, x_t, t, z, context)

    monkeypatch.setattr(LatentUNet, "forward", spy)
    _sd("sample", "--ckpt", ldm_either / "best.pt", "--subjects", 1, "--steps", 2, *extra, "--out", tmp_path / "s")
    if extra:
        assert seen == {(k, 0.0) for k in range(32)}
    else:  # middle-out: 16 alone, 17..31 see the slice below (+1), 15..0 the slice above (-1)
        assert seen == {(16, 0.0)} | {(k, 1.0) for k in range(17, 32)} | {(k, -1.0) for k in range(16)}


def test_evaluate_reports_consistency_beside_real_subjects(ldm_either, tmp_path, quick_eval):
    for extra, order in (([], "middle-out"), (["--independent"], "independent")):
        _sd("evaluate", "--ckpt", ldm_either / "best.pt", "--n", 1, "--steps", 3, *extra, "--out", tmp_path / "m.json")
        m = json.loads((tmp_path / "m.json").read_text())
        assert m["stack/order"] == order and m["n_subjects"] == 1 and m["n_samples"] == 32
        for key in ("adjacent_ssim", "adjacent_l1", "outline_jitter_sagittal", "z_monotone", "z_spacing"):
            assert math.isfinite(m[f"stack/{key}"]) and math.isfinite(m[f"stack/{key}_real"]), key
        assert m["n_subjects_real"] >= 1 and 0.5 < m["stack/adjacent_ssim_real"] <= 1


def test_prior_without_neighbours_needs_independent(ldm_alone, tmp_path):
    ckpt = ldm_alone / "best.pt"
    with pytest.raises(UserError, match=r"draws every slice alone \(trained with --neighbours none; --neighbours "
                                        r"either draws subjects\), so a stack of its slices is not one subject; "
                                        "pass --independent"):
        _sd("sample", "--ckpt", ckpt, "--subjects", 1, "--steps", 3, "--out", tmp_path / "s")
    _sd("sample", "--ckpt", ckpt, "--subjects", 1, "--steps", 3, "--independent", "--out", tmp_path / "s")
    assert (tmp_path / "s" / "subject_000.nii.gz").is_file()


def test_config_without_neighbours_loads_as_a_prior_without_them(ldm_alone, tmp_path):
    state = torch.load(ldm_alone / "best.pt", map_location="cpu", weights_only=True)
    for key in ("neighbours", "p_neighbour_drop", "spacing"):
        state["config"].pop(key)  # a checkpoint from before neighbour conditioning
    util.save_checkpoint(state, tmp_path / "old.pt")
    model, _, ckpt = stage_two.load_prior(sd.PRIOR, tmp_path / "old.pt", CPU)
    assert ckpt["config"]["neighbours"] == "none" and model.context_channels == 0
    assert sd.PRIOR.stack_orders(ckpt["config"]) == ()
    _sd("sample", "--ckpt", tmp_path / "old.pt", "--subjects", 1, "--steps", 3, "--independent",
        "--out", tmp_path / "s")  # the voxel size then comes from the data
    assert np.allclose(nib.load(tmp_path / "s" / "subject_000.nii.gz").header.get_zooms(),
                       dataset.voxel_spacing(ckpt["config"]["data"], 32)[0])


def test_bad_voxel_size_in_a_checkpoint_is_one_line(ldm_either, tmp_path):
    state = torch.load(ldm_either / "best.pt", map_location="cpu", weights_only=True)
    state["config"]["spacing"] = [3.5, 0, 3.5]
    util.save_checkpoint(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=r"bad\.pt: its config has spacing = \[3\.5, 0, 3\.5\], which must be three"):
        _sd("sample", "--ckpt", tmp_path / "bad.pt", "--subjects", 1, "--out", tmp_path / "s")


def test_neighbour_drop_must_leave_both_cases_to_learn(vae_run, tmp_path):
    for p in (0.0, 1.0):
        with pytest.raises(UserError, match=f"--p-neighbour-drop {p}: must lie strictly between 0 and 1"):
            _sd("train", "--ae", vae_run / "best.pt", "--preset", "smoke", "--p-neighbour-drop", p,
                "--out", tmp_path / f"r{p}")
        assert not (tmp_path / f"r{p}").exists()  # refused before a run folder is claimed


def test_cache_without_neighbour_indices_is_rebuilt(ldm_either, tmp_path):
    cache = torch.load(ldm_either / "latents.pt", map_location="cpu", weights_only=True)
    assert stage_two.load_cache(ldm_either / "latents.pt", cache["ae_sha256"]) is not None
    del cache["train_below"]
    torch.save(cache, tmp_path / "old.pt")
    assert stage_two.load_cache(tmp_path / "old.pt", cache["ae_sha256"]) is None


def test_pixelcnn_writes_independent_subjects_only(tmp_path, vqvae_run, cli):
    run = tmp_path / "pcnn"
    pixelCNN.main(["train", "--ae", str(vqvae_run / "best.pt"), "--preset", "smoke", "--out", str(run),
                   *map(str, cli.CADENCE)])
    with pytest.raises(UserError, match="PixelCNN draws every slice alone"):
        pixelCNN.main(["sample", "--ckpt", str(run / "best.pt"), "--subjects", "1", "--out", str(tmp_path / "s")])
    pixelCNN.main(["sample", "--ckpt", str(run / "best.pt"), "--subjects", "1", "--independent",
                   "--out", str(tmp_path / "s")])
    assert nib.load(tmp_path / "s" / "subject_000.nii.gz").shape == (32, 32, 32)


def test_bad_subject_flags_give_one_clear_line(ldm_either, tmp_path, cli):
    ckpt = ldm_either / "best.pt"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"x")
    cases = [
        (["--subjects", 0], "--subjects 0: must be at least 1"),
        (["--subjects", 2, "--z", "0..3"], "--z: does not apply with --subjects"),
        (["--subjects", 2, "--n", 2], "--n: does not apply with --subjects"),
        (["--subjects", 2, "--gif", tmp_path / "g.gif"], "--gif: does not apply with --subjects"),
        (["--subjects", 2, "--out", tmp_path / "s.png"], "with --subjects, --out is a folder"),
        (["--subjects", 2, "--out", tmp_path / "run"], "holds checkpoints (a run folder)"),
        (["--subjects", 2, "--independent", "--order", "bottom-up"], "--order bottom-up: does not apply with"),
        (["--independent"], "--independent: applies to whole subjects"),
        (["--order", "middle-out"], "--order middle-out: applies to whole subjects"),
        (["--subjects", 1, "--out", tmp_path / "earlier"], "already holds subject_*.nii.gz from an earlier run"),
    ]
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "subject_000.nii.gz").write_bytes(b"x")
    cli.one_line_errors("stable_diffusion.py", [(["sample", "--ckpt", ckpt, *a], m) for a, m in cases])
    assert (tmp_path / "run" / "best.pt").read_bytes() == b"x"
