"""util.py: metrics against scikit-image, checkpoints (atomic, safe loading), run dirs, logs, RNG state."""
import json
import pickle
import random

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import util
from util import UserError


def _pair(seed=0, n=3, size=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    y = (x + 0.25 * torch.randn(n, 1, size, size, generator=g)).clamp(-1, 1)
    return x, y


def test_ssim_matches_skimage():
    x, y = _pair()
    ours = util.ssim(x, y, data_range=2.0)
    ref = [structural_similarity(x[i, 0].numpy(), y[i, 0].numpy(), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=2.0) for i in range(len(x))]
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-5)
    assert torch.allclose(util.ssim(x, x), torch.ones(len(x)))


def test_valid_blur_matrix_is_numpy_valid_correlation():
    g = util._gaussian_window(11, 1.5)
    t = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    ref = np.stack([np.correlate(row, g.numpy(), mode="valid") for row in t.numpy()])
    np.testing.assert_allclose((t @ util._valid_blur_matrix(40, g)).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_ssim_matches_skimage_on_a_non_square_multichannel_pair():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 24, 37, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ref = [structural_similarity(x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5, channel_axis=0,
                                 use_sample_covariance=False, data_range=2.0) for i in range(len(x))]
    np.testing.assert_allclose(util.ssim(x, y).numpy(), ref, atol=1e-5)


@pytest.mark.parametrize("shape", [(10, 32), (32, 10), (5, 5)])
def test_ssim_refuses_images_smaller_than_its_window(shape):
    x = torch.zeros(1, 1, *shape)
    with pytest.raises(ValueError, match="11x11 window"):
        util.ssim(x, x)


def test_psnr_matches_skimage():
    x, y = _pair(1)
    ref = [peak_signal_noise_ratio(x[i, 0].numpy(), y[i, 0].numpy(), data_range=2.0) for i in range(len(x))]
    np.testing.assert_allclose(util.psnr(x, y).numpy(), ref, rtol=1e-5)


def test_ms_ssim_single_scale_reduces_to_ssim():
    x, y = _pair(2, size=20)  # 20 px: only one scale fits an 11x11 window -> MS-SSIM is SSIM (clamped)
    np.testing.assert_allclose(util.ms_ssim(x, y).numpy(), util.ssim(x, y).clamp(min=0).numpy(), atol=1e-6)
    x, y = _pair(3, size=64)
    assert torch.allclose(util.ms_ssim(x, x), torch.ones(3), atol=1e-6)
    assert (util.ms_ssim(x, y) < 1).all()


def test_checkpoint_round_trip_and_kind(tmp_path):
    state = {"kind": "stage1", "model": {"w": torch.arange(4.0)}, "step": 3, "rng": util.rng_state()}
    path = util.save_checkpoint(state, tmp_path / "last.pt")
    loaded = util.load_checkpoint(path, kind="stage1")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["step"] == 3
    assert not list(tmp_path.glob(".*tmp"))  # temporary file renamed away
    with pytest.raises(UserError, match="is a 'stage1' checkpoint, expected diffusion"):
        util.load_checkpoint(path, kind="diffusion")
    assert util.load_checkpoint(tmp_path, kind="stage1")["step"] == 3  # a run directory resolves to its checkpoint


class _Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_pickled_payload_is_refused_and_never_runs(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "stage1", "x": _Payload()}, path)
    with pytest.raises(UserError, match="refused"):
        util.load_checkpoint(path)
    assert "payload ran" not in capsys.readouterr().out


def test_truncated_and_missing_checkpoints(tmp_path):
    path = util.save_checkpoint({"kind": "stage1", "w": torch.randn(1000)}, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        util.load_checkpoint(path)
    with pytest.raises(UserError, match="no such checkpoint"):
        util.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError):
        util.load_checkpoint(tmp_path / "plain.pt")


def test_rng_state_round_trip_survives_safe_load(tmp_path):
    util.seed_everything(5)
    path = util.save_checkpoint({"kind": "x", "rng": util.rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    util.seed_everything(99)
    util.set_rng_state(util.load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_run_dir_never_clobbers(tmp_path):
    run = tmp_path / "run"
    util.prepare_run_dir(run)
    (run / "last.pt").write_bytes(b"keep")
    with pytest.raises(UserError, match="a run already exists"):
        util.prepare_run_dir(run)
    util.prepare_run_dir(run, resume=True)
    assert (run / "last.pt").read_bytes() == b"keep"


def test_unwritable_output_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write there"):
        util.check_writable(blocker / "sub")


def test_jsonl_reader_skips_partial_line(tmp_path):
    log = util.JsonlLogger(tmp_path / "log.jsonl")
    log.log({"step": 1, "loss/rec": torch.tensor(0.5)})
    log.log({"step": 2, "loss/rec": float("nan")})
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss/re')
    records = util.read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss/rec"] == 0.5 and records[1]["loss/rec"] == "nan"
    log.truncate_after(1)
    assert [r["step"] for r in util.read_jsonl(tmp_path / "log.jsonl")] == [1]


def test_image_grid_layout_and_gif(tmp_path):
    imgs = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    grid = util.image_grid(imgs, nrow=2, pad=1)
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1)
    assert grid[1, 1] == 0 and grid[1, 6] == 128 and grid[6, 1] == 255
    path = util.save_gif([grid, 255 - grid], tmp_path / "a.gif")
    from PIL import Image

    assert Image.open(path).n_frames == 2


def test_save_json_atomic(tmp_path):
    util.save_json({"a": 1}, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {"a": 1}
