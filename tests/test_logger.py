"""Tests of logger.py: reading logs of runs in progress, grouping, smoothing, log scale, the CLI.

Run: .venv/bin/python -m pytest -q tests/test_logger.py
"""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import logger
from util import UserError


def write_log(run_dir, records, tail=""):
    """RUN_DIR/log.jsonl from dict records, plus raw text appended (e.g. a line cut mid-write)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "log.jsonl").write_text(text)
    return run_dir


def stage1_records(n=60):
    """Records shaped like a stage-one VAE run: losses, weights, lr, sparse validation, a 'nan' string."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        step = 10 * i
        r = {"step": step, "epoch": step // 200, "loss/rec": float(1 / (1 + i / 5) + 0.05 * rng.random()),
             "loss/kl": float(10 ** (4 - i / 10)), "w/kl": step * 1e-9, "lr": 4e-4, "images_per_s": 100.0 + i,
             **{f"loss_t/q{q}": 0.1 * q + 0.01 * rng.random() for q in range(1, 5)}}
        if i % 10 == 0:
            r.update({"val/ssim": 0.5 + i / 200, "val/psnr": "nan" if i == 0 else 20.0 + i / 10})
        out.append(r)
    return out


def test_read_run_skips_partial_line_and_non_finite_strings(tmp_path):
    run = write_log(tmp_path / "run", stage1_records(20), tail='{"step": 200, "loss/rec": 0.')
    series = logger.read_run(run)
    steps, values = series["loss/rec"]
    assert len(steps) == 20 and steps[-1] == 190  # the cut-off record is not read
    psnr_steps, psnr = series["val/psnr"]
    assert psnr_steps.tolist() == [100.0] and np.isfinite(psnr).all()  # the "nan" at step 0 is dropped
    assert "step" not in series and "epoch" not in series


def test_number_parsing():
    assert logger._number("inf") is None and logger._number("nan") is None and logger._number("-Infinity") is None
    assert logger._number("0.5") == 0.5 and logger._number(3) == 3.0
    assert logger._number(True) is None and logger._number("text") is None and logger._number([1]) is None


def test_panels_group_quartiles_and_order_losses_first():
    run = {name: (np.arange(3.0), np.ones(3)) for name in
           ["val/ssim", "lr", "loss_t/q1", "loss_t/q2", "loss_t/q3", "loss_t/q4", "loss/rec", "zeta"]}
    panels = logger.collect_panels([run])
    titles = list(panels)
    assert "loss_t/q*" in titles and len(panels["loss_t/q*"]) == 4
    assert not any(t.startswith("loss_t/q") and t != "loss_t/q*" for t in titles)
    assert titles.index("loss/rec") < titles.index("val/ssim") < titles.index("lr") < titles.index("zeta")


def test_moving_average_and_log_scale_rule():
    v = np.array([0.0, 0.0, 3.0, 0.0, 0.0])
    assert logger.moving_average(v, 3).tolist() == pytest.approx([0, 1, 1, 1, 0])
    assert logger.moving_average(v, 1) is v
    ramp = np.arange(10.0)
    assert logger.moving_average(ramp, 3)[1:-1] == pytest.approx(ramp[1:-1])  # centred: no lag on a ramp
    assert logger.use_log_scale([np.array([1e-3, 1.0])])
    assert not logger.use_log_scale([np.array([0.5, 2.0])])
    assert not logger.use_log_scale([np.array([0.0, 1e3])])  # not positive
    assert not logger.use_log_scale([np.array([-1e-3, 1.0])])


def test_plot_two_runs_with_disjoint_series_and_smoothing(tmp_path, capsys):
    a = write_log(tmp_path / "vae", stage1_records(), tail='{"step": 600, "loss')
    b = write_log(tmp_path / "vq", [{"step": 10 * i, "loss/rec": 0.8 / (1 + i), "loss/vq": "inf" if i == 3 else 0.1,
                                     "val/codebook_usage": 0.3} for i in range(30)])
    out = tmp_path / "cmp" / "curves.png"
    assert logger.main([str(a), str(b), "--smooth", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "2 runs" in printed
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 300


def test_default_output_for_one_and_several_runs(tmp_path, monkeypatch):
    run = write_log(tmp_path / "only", stage1_records(5))
    assert logger.main([str(run)]) == 0
    assert (run / "curves.png").is_file()
    other = write_log(tmp_path / "other", stage1_records(5))
    monkeypatch.chdir(tmp_path)
    assert logger.main([str(run), str(other)]) == 0
    assert (tmp_path / "curves.png").is_file()


def test_run_labels_disambiguate_equal_names(tmp_path):
    assert logger.run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    labels = logger.run_labels([tmp_path / "x" / "run", tmp_path / "y" / "run"])
    assert labels[0] != labels[1]


def test_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        logger.main([str(tmp_path / "missing")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(UserError, match="no log.jsonl"):
        logger.main([str(tmp_path / "empty_dir")])
    write_log(tmp_path / "fresh", [], tail='{"step": 0, "lo')
    with pytest.raises(UserError, match="nothing to plot"):
        logger.main([str(tmp_path / "fresh")])
    with pytest.raises(UserError, match="--smooth"):
        logger.main([str(tmp_path / "fresh"), "--smooth", "0"])


def test_cli_missing_dir_is_one_line_error(tmp_path, cli):
    proc = cli.run("logger.py", tmp_path / "nope", timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
