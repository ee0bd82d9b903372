"""Each playground script runs from the repo root as `python playground/x.py` and writes its figure.

codebook_usage.py needs a VQ-VAE checkpoint: a 2-step smoke run of prestage_train.py on a tiny
disc dataset makes one (about 5 s of CPU). Its log.jsonl also feeds logger.py, so the plotter is
checked on a log that the real trainer wrote.

Run: .venv/bin/python -m pytest -q tests/test_playground.py
"""
import json

import pytest
from PIL import Image


def run(cli, args, timeout=120):
    """Run a repo script from the repo root (one thread per subprocess: these are tiny jobs, and spinning
    threads crawl on a shared machine); returns the CompletedProcess."""
    return cli.run(*args, timeout=timeout)


def check_png(path, min_size=(300, 200)):
    """The file is a readable PNG of a plausible size."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size


@pytest.fixture(scope="module")
def discs(tmp_path_factory, write_disc_dataset):
    """A tiny OASIS-layout dataset at 32x32."""
    return write_disc_dataset(tmp_path_factory.mktemp("discs"))


@pytest.mark.parametrize("script,args,expect", [
    ("noise_schedules.py", ["--timesteps", "200"], "cosine"),
    ("kl_annealing.py", ["--steps", "300", "--settings", "1:1.0", "3:0.5"], ""),
    ("sinusoidal_embedding.py", ["--z-dim", "16", "--t-dim", "32", "--timesteps", "100"], "similarity"),
])
def test_script_writes_its_figure(tmp_path, script, args, expect, cli):
    out = tmp_path / "figure.png"
    proc = run(cli, [f"playground/{script}", *args, "--out", out])
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout and expect in proc.stdout
    check_png(out)


def test_forward_diffusion_on_given_data(tmp_path, discs, cli):
    out = tmp_path / "fwd.png"
    proc = run(cli, ["playground/forward_diffusion.py", "--data", discs, "--size", "32", "--z", "20",
                "--t", "0", "100", "999", "--out", out])
    assert proc.returncode == 0, proc.stderr
    check_png(out, (200, 150))
    bad = run(cli, ["playground/forward_diffusion.py", "--data", discs, "--size", "32", "--t", "1000", "--out", out])
    assert bad.returncode == 1 and bad.stderr.startswith("error: --t 1000") and "Traceback" not in bad.stderr


def test_bad_arguments_are_one_line_errors(tmp_path, cli):
    proc = run(cli, ["playground/sinusoidal_embedding.py", "--z-dim", "7", "--out", tmp_path / "x.png"])
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --z-dim 7: must be an even number >= 2"
    proc = run(cli, ["playground/codebook_usage.py", "--ckpt", tmp_path / "none.pt", "--out", tmp_path / "x.png"])
    assert proc.returncode == 1 and proc.stderr.startswith("error: --ckpt") and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, discs, cli):
    """A VQ-VAE run directory from a 2-step smoke run of prestage_train.py (skips if that CLI fails)."""
    out = tmp_path_factory.mktemp("vq") / "run"
    proc = run(cli, ["prestage_train.py", "--model", "vqvae", "--preset", "smoke", "--data", discs, "--out", out,
                "--steps", "2", "--val-every", "2", "--ckpt-every", "2", "--val-max", "16"], timeout=300)
    if proc.returncode != 0 or not (out / "best.pt").is_file():
        pytest.skip(f"prestage_train.py smoke run failed, no VQ-VAE checkpoint to test with: "
                    f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return out


def test_codebook_usage_of_a_trained_vqvae(tmp_path, vq_run, cli):
    out = tmp_path / "codes.png"
    proc = run(cli, ["playground/codebook_usage.py", "--ckpt", vq_run / "best.pt", "--device", "cpu", "--out", out])
    assert proc.returncode == 0, proc.stderr
    assert "codes used, perplexity" in proc.stdout
    check_png(out)


def test_texture_gap_of_a_trained_autoencoder(tmp_path, vq_run, cli):
    out, table = tmp_path / "texture.png", tmp_path / "t.json"
    proc = run(cli, ["playground/texture.py", "--ckpt", vq_run / "best.pt", "--device", "cpu", "--n", "40",
                     "--out", out, "--json", table])
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(table.read_text())
    assert set(rows) == {"level_32", "level_16"}
    for row in rows.values():
        assert row["ratio"] == pytest.approx(row["recon"] / row["real"]) and row["real"] > 0
    assert f"{rows['level_32']['ratio']:.2f}x" in proc.stdout
    check_png(out)
    proc = run(cli, ["playground/texture.py", "--ckpt", vq_run / "best.pt", "--n", "1", "--out", out])
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --n 1: must be at least 2 slices"


def test_logger_plots_a_real_training_log(tmp_path, vq_run, cli):
    proc = run(cli, ["logger.py", vq_run, "--out", tmp_path / "curves.png"])
    assert proc.returncode == 0, proc.stderr
    check_png(tmp_path / "curves.png")


def test_label_designs_prints_a_row_per_design(vqvae_run, cli):
    proc = run(cli, ["playground/label_designs.py", "--ae", vqvae_run / "best.pt", "--steps", "2"])
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "Dice" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == ["real -> real", "real -> recon", "recon -> recon", "latent",
                                                     "recon + latent"]
    for r in rows:  # Dice per tissue and mean, each a number in [0, 1]
        assert all(0 <= float(v) <= 1 for v in r.strip("| ").split(" | ")[1:5]), r
