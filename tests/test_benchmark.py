"""playground/benchmark.py in its tiny --quick mode: it runs every group, prints one markdown table and
writes JSON of the documented shape. MONAI is not needed: when it is absent (as in the repo's .venv) the
script must say so in one line and time our models only; when it happens to be importable the test switches
it off with --no-monai, so the run stays quick either way.

Run: .venv/bin/python -m pytest -q tests/test_benchmark.py
"""
import importlib.util
import json

MONAI_IMPORTABLE = importlib.util.find_spec("monai") is not None


def run(cli, args, timeout=300):
    """`python playground/benchmark.py *args` from the repo root, one thread per process."""
    return cli.run("playground/benchmark.py", *args, timeout=timeout)


def test_quick_run_prints_a_table_and_writes_json(tmp_path, cli):
    out = tmp_path / "bench.json"
    args = ["--quick", "--threads", "1", "--channels-last", "--monai-path", tmp_path / "no_monai_here", "--out", out]
    if MONAI_IMPORTABLE:
        args.append("--no-monai")
    proc = run(cli, args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()

    # MONAI absent (or switched off): exactly one line says so, and no MONAI rows follow
    notes = [line for line in lines if line.startswith("MONAI ")]
    assert len(notes) == 1 and "timing our models only" in notes[0], notes
    assert "| monai" not in proc.stdout

    # one markdown table with the documented columns and a row per measured configuration
    header = next(i for i, line in enumerate(lines) if line.startswith("| benchmark |"))
    cols = [c.strip() for c in lines[header].strip("|").split("|")]
    assert cols == ["benchmark", "impl", "params (M)", "GFLOP/item", "batch", "items/s", "s/item", "our/peer",
                    "peak mem (MB)", "notes"]
    assert set(lines[header + 1].strip("|").split("|")) == {"---"}
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert all(len(r) == len(cols) for r in rows)
    names = [(r[0], r[1]) for r in rows]
    assert names == [("vae_train", "ours"), ("vae_train", "ours (channels_last)"),
                     ("vae_train", "ours (LDM decoder + z)"), ("unet_train", "ours"),
                     ("unet_train", "ours (channels_last)"), ("sample ddim", "ours"), ("sample dpmpp", "ours"),
                     ("sample ddpm", "ours"), ("pixelcnn sample_codes num_threads=1", "ours"), ("data", "ours")], names
    assert not any("error" in r[-1] for r in rows), rows
    for r in rows:
        value, unit = r[5].split()
        assert float(value) > 0 and unit.endswith("/s"), r
    assert "extrapolated" in dict(((r[0], r[-1]) for r in rows))["sample ddpm"]
    assert "consumer" in rows[-1][7]  # the loader's rate over the training step's
    assert any(line.startswith("load average before") for line in lines)

    # JSON: run metadata and one record per row, with the numbers the table shows
    data = json.loads(out.read_text())
    meta, results = data["meta"], data["results"]
    assert meta["threads"] == 1 and meta["quick"] is True and meta["monai"] is False
    assert len(meta["load_before"]) == 3 and "benchmark.py" in meta["command"]
    assert [(r["kind"], r["impl"], r["variant"]) for r in results][:2] == [("vae_train", "ours", "eager"),
                                                                          ("vae_train", "ours", "channels_last")]
    assert len(results) == len(rows)
    for r in results:
        assert "error" not in r, r
        assert r["items_per_s"] > 0 and r["unit"] in ("slices", "latents", "grids") and r["batch"] >= 1
        assert isinstance(r["peak_mem_mb"], (int, float)) and r["peak_mem_mb"] >= 0
        assert len(r["times"]) == 1  # --quick: one timed repeat
    train = [r for r in results if r["kind"].endswith("_train")]
    assert all(r["params_m"] > 0 and r["gflop_per_item"] > 0 for r in train)
    assert "speedup_vs_eager" in train[1]
    # the VAE rows: matched to MONAI (decoder blocks = encoder blocks, unconditional) and as shipped
    matched, shipped = train[0], train[2]
    assert shipped["variant"] == "LDM decoder + z"
    assert shipped["params_m"] > matched["params_m"] and shipped["gflop_per_item"] > matched["gflop_per_item"]
    assert "1 block(s)/level; unconditional" in matched["notes"][-1]
    assert "2 block(s)/level; z-conditioned" in shipped["notes"][-1]
    data_row = results[-1]
    assert data_row["kind"] == "data" and data_row["ratio"] > 0


def test_bad_arguments_fail_without_running_anything(tmp_path, cli):
    proc = run(cli, ["--quick", "--threads", "0"], timeout=60)
    assert proc.returncode == 2 and "--threads 0" in proc.stderr
    proc = run(cli, ["--quick", "--rounds", "0"], timeout=60)
    assert proc.returncode == 2 and "--rounds 0" in proc.stderr
    proc = run(cli, ["--quick", "--only", "vae,nonsense"], timeout=60)
    assert proc.returncode != 0 and "nonsense" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_rounds_keep_each_configurations_median_round(tmp_path, cli):
    out = tmp_path / "bench.json"
    proc = run(cli, ["--quick", "--threads", "1", "--no-monai", "--only", "data", "--rounds", 3, "--out", out])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sum("round " in line and "data ours" in line for line in proc.stdout.splitlines()) == 3
    (row,) = json.loads(out.read_text())["results"]
    assert len(row["rounds"]) == 3 and row["items_per_s"] == sorted(row["rounds"])[1]
    assert row["notes"][0].startswith("median of 3 rounds (")


def test_median_round_picks_the_lower_middle_and_survives_errors(playground_module):
    benchmark = playground_module("benchmark")

    runs = [dict(items_per_s=5.0), dict(error="worker exit 1"), dict(items_per_s=9.0), dict(items_per_s=7.0),
            dict(items_per_s=1.0)]
    pick = benchmark.median_round(runs)
    assert pick["items_per_s"] == 5.0 and pick["rounds"] == [5.0, None, 9.0, 7.0, 1.0]
    assert pick["notes"] == ["median of 4 rounds (1 5 7 9)"]
    assert benchmark.median_round([dict(error="a"), dict(error="b")]) == dict(error="b")
    assert benchmark.median_round([dict(items_per_s=2.0, notes=["x"])]) == dict(items_per_s=2.0, notes=["x"])
