"""trainer.py: hyperparameters declared once (presets as differences, generated flags), the step boilerplate
owned by the Trainer, and per-rank RNG streams under torchrun that resume exactly."""
import argparse
import json
import time

import pytest
import torch

import prestage_train
import trainer as tr
import util

H = tr.Hyper
HYPERS = [H("width", 64, "channels", "model"), H("mode", "a", "a mode", "loss", choices=("a", "b")),
          H("flag", True, "a switch", "model", applies="vqvae", arg="switch"), H("mult", [1, 2], "levels", "model"),
          *tr.loop_hypers(steps=100, batch_size=8, lr=1e-3, warmup=0, lr_schedule="cosine", log_every=10,
                          val_every=50, ckpt_every=50)]
PRESETS = {"full": {}, "demo": dict(width=16, steps=10)}


def test_presets_are_differences_from_full():
    demo = tr.preset_values(HYPERS, PRESETS, "demo")
    full = tr.preset_values(HYPERS, PRESETS, "full")
    assert demo == dict(full, width=16, steps=10)
    assert full["lr_schedule"] == "cosine" and full["seed"] == 0 and len(full) == len(HYPERS)
    with pytest.raises(ValueError, match=r"preset 'demo' sets undeclared hyperparameters \['widht'\]"):
        tr.preset_values(HYPERS, {"full": {}, "demo": {"widht": 3}}, "full")


def test_flags_are_generated_from_the_table_in_groups():
    p = argparse.ArgumentParser()
    groups = tr.add_common_args(p, HYPERS, PRESETS)
    assert {"model", "loss", "optimisation", "loop", "run"} <= set(groups)
    args = p.parse_args(["--width", "32", "--no-flag", "--mult", "1,2,4", "--mode", "b", "--lr", "0.5"])
    assert (args.width, args.flag, args.mult, args.mode, args.lr) == (32, False, [1, 2, 4], "b", 0.5)
    assert args.steps is None  # not given: the preset decides
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    text = p.format_help()
    assert "[full 64; demo 16]" in text and "(vqvae only)" in text and "[all presets: a]" in text


def test_model_kwargs_follow_where_each_hyperparameter_applies():
    config = tr.preset_values(HYPERS, PRESETS, "full")
    assert tr.model_kwargs(HYPERS, config, "vqvae") == {"width": 64, "switch": True, "mult": [1, 2]}
    assert tr.model_kwargs(HYPERS, config, "vae") == {"width": 64, "mult": [1, 2]}


def test_stage_one_resolves_the_recorded_presets():
    # the resolved configs that earlier runs recorded in config.json (values as they were before the table)
    smoke = tr.preset_values(prestage_train.HYPERS, prestage_train.PRESETS, "smoke")
    assert smoke["size"] == 32 and smoke["n_embed"] == 32 and smoke["perceptual"] == "msssim"
    assert smoke["perceptual_weight"] == 0.5 and smoke["kl_weight"] == 1e-6 and smoke["vq_ema"] is True
    demo = tr.preset_values(prestage_train.HYPERS, prestage_train.PRESETS, "demo")
    assert (demo["n_embed"], demo["lr"], demo["batch_size"], demo["steps"]) == (1024, 1e-3, 4, 3400)
    # since 2026-12-04 the demo's GAN starts at a quarter of the run on the finest band, with feature matching
    assert (demo["disc_start"], demo["disc_highpass"], demo["fm_weight"]) == (850, True, 1.0)
    cfg = prestage_train.autoencoder_config(dict(smoke, model="vae", conditional=True, num_z=32))
    assert "n_embed" not in cfg and cfg["resolution"] == 32 and cfg["decoder_extra_block"] is True


class _LrTask(tr.Task):
    """Records the learning rate its optimisers hold when train_step runs."""

    kind = "probe"

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(1, 1)
        self.models = {"model": self.model}
        self.optimizers = {"a": torch.optim.SGD(self.model.parameters(), lr=1.0),
                           "b": torch.optim.SGD(self.model.parameters(), lr=1.0)}
        self.seen = []

    def train_step(self, batch, step):
        self.seen.append([opt.param_groups[0]["lr"] for opt in self.optimizers.values()])
        assert self.nets["model"] is self.model  # one process, no --compile: the model itself
        return {"loss/x": torch.zeros(())}


def test_trainer_sets_every_learning_rate_before_each_step(tmp_path):
    config = dict(out=str(tmp_path / "run"), steps=6, batch_size=2, lr=0.4, warmup=2, lr_schedule="cosine",
                  log_every=3, val_every=100, ckpt_every=100, seed=0)
    task = _LrTask()
    tr.start_run(task, config, (torch.zeros(8, 1),), None, False, 0, 1, torch.device("cpu")).fit()
    expected = [tr.lr_at(step, config) for step in range(6)]
    assert task.seen == [[lr, lr] for lr in expected]
    logged = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())]
    assert logged == [expected[2], expected[5]]


def test_rank_seeds_keep_rank_zero_and_differ_per_rank():
    assert tr.rank_seed(7, 0) == 7
    assert len({tr.rank_seed(7, r) for r in range(8)}) == 8


def _probe(cli, out, stop_at, phase, ddp=True):
    argv = ["tests/ddp_noise_probe.py", out, stop_at, phase]
    if ddp:
        argv = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={cli.free_port()}", *argv]
    proc = cli.run(*argv)
    # the ranks' own lines first: torchrun's failure report alone fills the tail and hides the cause
    ranks = [line for line in proc.stderr.splitlines() if "torch/distributed/" not in line]
    assert proc.returncode == 0, "\n".join(ranks)[:3000] + "\n...\n" + proc.stderr[-1000:]
    return json.loads((out / f"draws_{phase}.json").read_text())


@pytest.mark.ddp
def test_ddp_ranks_draw_their_own_noise_and_resume_exactly(tmp_path, cli):
    whole = _probe(cli, tmp_path / "whole", 0, "first")
    assert [row[0] for row in whole[0]] == [row[0] for row in whole[1]] == list(range(6))
    assert all(a[1:] != b[1:] for a, b in zip(*whole))  # rank 1 draws other noise than rank 0 at every step
    # rank 0 keeps the single-process stream
    assert _probe(cli, tmp_path / "single", 0, "first", ddp=False)[0] == whole[0]
    # paused at step 3 (last.pt holds both ranks' RNG states) and resumed: the same draws on each rank
    first = _probe(cli, tmp_path / "paused", 3, "first")
    assert len(first[1]) == 3 and len(torch.load(tmp_path / "paused" / "last.pt", weights_only=True)["rng_ranks"]) == 2
    resumed = _probe(cli, tmp_path / "paused", 0, "resume")
    assert [first[r] + resumed[r] for r in range(2)] == whole
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "paused" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.ddp
def test_ddp_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path, cli):
    # Before the ranks agreed on the guard, the rank with the NaN raised and the other waited in the next
    # collective until the timeout.
    proc = cli.run("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={cli.free_port()}",
                   "tests/ddp_noise_probe.py", tmp_path / "nan", 0, "nan", timeout=120)
    assert proc.returncode != 0
    assert "rank 1: non-finite loss at step 3: loss/mse = nan" in proc.stdout
    assert "rank 0: non-finite loss on another rank by step 3" in proc.stdout


def test_thread_governor_gives_busy_cores_back(monkeypatch):
    """Threads follow the cores other processes leave free (readings of util.cpu_times: busy core-seconds of the
    machine, our CPU seconds, wall seconds), are back to all once the load is gone, and to the start-up count
    after `restore`."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    t = time.perf_counter() - 10  # readings 2 s apart, the last one now
    readings = iter([(10.0, 5.0, t + 4), (14.0, 7.0, t + 6), (17.8, 10.8, t + 8), (18.0, 11.0, t + 10)])
    monkeypatch.setattr(util, "cpu_times", lambda: next(readings))
    said = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = tr.ThreadGovernor(torch.device("cpu"), said.append)
        gov.cores = 2
        gov.adjust()  # 4 busy core-seconds in 2 s, 2 of them ours: others kept 1 core busy
        assert torch.get_num_threads() == 1 and said == [
            "note: other processes kept 1.0 of 2 cores busy: training on 1 thread now (set OMP_NUM_THREADS to fix "
            "the count)"]
        gov.adjust()  # the load is gone: the 3.8 busy core-seconds were all ours
        assert torch.get_num_threads() == 2 and "training on 2 threads now" in said[-1]
        gov.adjust(min_wall=1e9)  # too soon after the last reading: nothing read, nothing changed
        assert len(said) == 2 and next(readings) == (18.0, 11.0, t + 10)
        torch.set_num_threads(1)
        gov.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_thread_governor_rule_and_where_it_is_off(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    gov = tr.ThreadGovernor(torch.device("cpu"))
    gov.cores, gov.most = 2, 2
    # (cores others keep busy, threads now) -> threads; between 0.15 and 0.4 the count stays where it is
    cases = {(0.0, 2): 2, (0.3, 2): 2, (0.5, 2): 1, (1.9, 2): 1, (1.0, 1): 1, (0.3, 1): 1, (0.1, 1): 2}
    assert {case: gov.threads_for(*case) for case in cases} == cases
    gov.cores, gov.most = 8, 6
    cases = {(0.0, 6): 6, (1.0, 6): 6, (2.5, 6): 5, (7.5, 6): 1, (2.5, 5): 5, (1.1, 5): 6}
    assert {case: gov.threads_for(*case) for case in cases} == cases
    assert not tr.ThreadGovernor(torch.device("cuda")).enabled
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert not tr.ThreadGovernor(torch.device("cpu")).enabled  # the user's count stands


def test_cpu_times_counts_this_process(monkeypatch):
    before = util.cpu_times()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # 0.3 s of our own work on one core
        pass
    after = util.cpu_times()
    assert after[1] - before[1] >= 0.2 and after[0] - before[0] >= 0.2  # ours is counted in the machine's busy time
    assert util.foreign_cores(before, before) is None


def test_the_ema_averages_the_parameters_and_copies_the_buffers():
    model = torch.nn.BatchNorm1d(3)  # weight, bias and running statistics (buffers)
    ema = tr.EMA(model, decay=0.75)
    old = {k: v.clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.arange(1.0, 4.0))
        model.running_mean.fill_(5.0)
        model.num_batches_tracked.fill_(7)
    ema.update(model)
    for k, v in ema.model.named_parameters():  # 0.75 * old + 0.25 * new, the new being old + (1, 2, 3)
        torch.testing.assert_close(v, old[k] + 0.25 * torch.arange(1.0, 4.0))
    assert torch.equal(ema.model.running_mean, torch.full((3,), 5.0)) and int(ema.model.num_batches_tracked) == 7
    ema.update(model, decay=0.0)  # decay 0: a copy of the weights
    assert all(torch.equal(a, b) for a, b in zip(ema.model.parameters(), model.parameters()))
    assert ema.decay == 0.75 and not any(p.requires_grad for p in ema.model.parameters())
