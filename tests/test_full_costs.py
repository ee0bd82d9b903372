"""playground/full_costs.py (the full presets' counted costs and GPU projection) and playground/gpu_check.py
(the one-shot GPU check), as far as a CPU allows: the arithmetic against hand computations, every trainer
measured at its smoke preset, the check's parts on CPU, and the refusals."""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def costs(playground_module):
    return playground_module("full_costs")


@pytest.fixture(scope="module")
def check(playground_module, costs):  # gpu_check imports full_costs as a sibling, loaded by `costs`
    return playground_module("gpu_check")


def test_saved_bytes_counts_what_a_linear_layer_keeps_per_image(costs):
    layer = torch.nn.Linear(10, 5)

    def step(batch, input_grad):
        return lambda: layer(torch.randn(batch, 10, requires_grad=input_grad)).sum().backward()
    # Linear keeps its input (10 floats per image) for the weight's gradient and, only where the input needs
    # a gradient too, its weight (50 floats at any batch size)
    assert [costs.saved_bytes(step(b, False)) for b in (1, 2)] == [10 * 4, 20 * 4]
    assert [costs.saved_bytes(step(b, True)) for b in (1, 2)] == [(10 + 50) * 4, (20 + 50) * 4]


def test_memory_plan_and_projection_by_hand(costs):
    params, ema, act = 100_000_000, 50_000_000, 2e9  # 1.6 GB + 0.2 GB static, 2 GB per image
    need, fits = costs.memory_plan(params, ema, act, batch=8)
    assert need == pytest.approx(1.8 + 16.0)
    assert fits["24GB"] == {"fits": True, "max_batch": int((0.9 * 24e9 - 1.8e9) // 2e9)}  # 9
    assert fits["40GB"]["max_batch"] == 17 and fits["80GB"]["max_batch"] == 35
    tight = costs.memory_plan(params, ema, act, batch=10)[1]
    assert tight["24GB"]["fits"] is False and tight["40GB"]["fits"] is True
    seconds, hours = costs.project(gflop_per_image=500.0, batch=16, steps=150_000, mfu=0.5)
    assert seconds == pytest.approx(500e9 * 16 / (989e12 * 0.5))
    assert hours == pytest.approx(seconds * 150_000 / 3600)


@pytest.mark.parametrize("trainer", ["vqvae", "vae", "diffusion", "pixelcnn"])
def test_every_trainer_is_measured_at_its_smoke_preset(costs, trainer):
    row = costs.measure(trainer, "smoke", repeats=1)
    assert row["trainer"] == trainer and row["device"] == "cpu" and row["timed_batch"] == 1
    assert row["params_m"] > 0 and row["gflop_per_image"] > 0 and row["act_mb_per_image"] > 0 and row["step_s"] > 0
    assert set(row["fits"]) == {"24GB", "40GB", "80GB"} and row["fits"]["80GB"]["fits"]
    want, _ = costs.project(row["gflop_per_image"], row["batch"], row["steps"], row["mfu"])
    assert row["projected_gpu_step_s"] == pytest.approx(want, abs=1e-4)
    table = costs.table([row])
    assert table.splitlines()[2].startswith(f"| {trainer} | {row['params_m']} |")


def test_stage_two_rows_take_their_shapes_from_the_stage_one(costs):
    task, cfg, batch = costs.build("diffusion", "smoke")
    assert cfg["latent_shape"] == [4, 16, 16]  # smoke stage one: 32x32 slices, one downsampling
    task, cfg, batch = costs.build("pixelcnn", "smoke")
    assert cfg["grid"] == [16, 16] and cfg["n_codes"] == 32 and batch(3)[0].shape == (3, 16, 16)


def test_fp32_switch_turns_the_tasks_autocast_off(costs):
    import util

    with costs.precision(False):
        assert type(util.autocast(torch.device("cuda"))).__name__ == "nullcontext"
    assert isinstance(util.autocast(torch.device("cpu")), torch.autocast)


def test_command_line(cli, tmp_path):
    out = tmp_path / "costs.json"
    proc = cli.run("playground/benchmark.py", "--preset", "smoke", "--repeats", "1", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| trainer | params (M) |" in proc.stdout and "projections at 35%" in proc.stdout
    assert [r["trainer"] for r in json.loads(out.read_text())] == ["vqvae", "vae", "diffusion", "pixelcnn"]
    cli.one_line_errors("playground/full_costs.py", [
        (["--only", "vqvae,gan"], "--only vqvae,gan: expected a comma-separated list"),
        (["--mfu", "2"], "--mfu 2.0: must lie in (0, 1]"),
        (["--preset", "huge"], "--preset huge: expected one of"),
        (["--device", "cuda"], "--device cuda: torch sees no CUDA GPU"),
    ])


def test_gpu_check_refuses_on_cpu_in_one_line(cli, tmp_path):
    cli.one_line_errors("playground/gpu_check.py", [
        (["--out", tmp_path / "g"], "gpu_check needs a CUDA GPU"),
        (["--only", "step_rates,magic"], "--only step_rates,magic: expected"),
    ])
    assert not (tmp_path / "g").exists()


def test_gpu_check_parts_run_on_cpu_and_make_one_report(check):
    seen = []  # the report is rewritten after every part, so a run cut short keeps what it measured
    results = check.run_parts(["step_rates", "stage_one_run", "benchmark"], {
        "step_rates": dict(device="cpu", preset="smoke", trainers=["pixelcnn"], repeats=1, compiled=()),
        "stage_one_run": dict(device="cpu", preset="smoke", size=32, steps=4),
        "benchmark": dict(device="cpu", quick=True, no_such_option=1),  # a part that fails is recorded
    }, after_each=lambda r: seen.append(list(r)))
    assert seen == [["step_rates"], ["step_rates", "stage_one_run"], ["step_rates", "stage_one_run", "benchmark"]]
    rates = results["step_rates"]["result"]
    assert [(r["trainer"], r["amp"], r["compile"]) for r in rates] == [("pixelcnn", False, False)] * 2  # no bf16 on CPU
    run = results["stage_one_run"]["result"]
    assert run["steps"] == 4 and 0 < run["val/ssim"] <= 1 and run["images_per_s_last"] > 0
    assert "unexpected keyword argument 'no_such_option'" in results["benchmark"]["error"]
    report = check.markdown(results, dict(gpu="cpu", torch=torch.__version__, date_utc="now", total_s=1))
    assert "| pixelcnn | fp32 | no | 1 |" in report and "## Short full-preset stage-one run" in report
    assert "**benchmark failed**" in report
