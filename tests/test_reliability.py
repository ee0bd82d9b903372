"""Reliability of the three trainers (prestage_train.py, stable_diffusion.py train, pixelCNN.py train)
and the loop they share (trainer.py): SIGKILL at random moments then --resume, SIGTERM/SIGINT,
hostile or broken checkpoints, bad data and outputs at start-up, and non-finite numbers.

Every check runs a real training script on the tiny 32x32 data (smoke preset). Runs that must be
killed are subprocesses; the uninterrupted reference runs and most error checks run in-process.
About two to three minutes on 2 CPU cores (OMP_NUM_THREADS=1).
"""
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import pixelCNN
import prestage_train
import stable_diffusion
import trainer
import util
from util import UserError

MAIN = {"prestage_train.py": prestage_train.main, "stable_diffusion.py": stable_diffusion.main,
        "pixelCNN.py": pixelCNN.main}
KIND = {"vae": "stage1", "vqvae": "stage1", "ldm": "diffusion", "pixelcnn": "pixelcnn"}
MODELS = {"vae": ("model", "disc"), "vqvae": ("model", "disc"), "ldm": ("model", "ema"), "pixelcnn": ("model", "ema")}
STEPS, CKPT = 24, 4  # kill-chain runs: 6 checkpoints, validation only at the end (--val-every 1000)


# ----------------------------------------------------------------------------------------------
# Helpers


# The subprocesses (the `cli` fixture) run on the thread count this process is pinned to (the `one_thread`
# fixture of conftest.py): CPU kernels may sum in another order with another thread count, and the runs are
# compared bit for bit with in-process ones.


class _Launched:
    """A training subprocess with stdout/stderr in files (no pipe can fill up and stall it)."""

    def __init__(self, cli, argv, logdir, tag):
        self.out, self.err = logdir / f"{tag}.out", logdir / f"{tag}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = cli.popen(*argv, stdout=out, stderr=err)

    def finish(self, timeout=300):
        rc = self.proc.wait(timeout=timeout)
        return rc, self.out.read_text(), self.err.read_text()


def _wait_for(pred, proc, timeout=180, interval=0.005):
    """Poll `pred` until it holds (True), the process ends or the timeout passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(interval)
    return False


def _loss_steps(run):
    """Steps of the training records (those with loss terms) in log.jsonl, in file order."""
    path = run / "log.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in util.read_jsonl(path) if any(k.startswith("loss/") for k in r)]


def _last_step(run):
    steps = _loss_steps(run)
    return steps[-1] if steps else 0


def _records(run):
    """log.jsonl without the throughput numbers (which depend on the machine's load)."""
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in util.read_jsonl(run / "log.jsonl")]


def _tmp_files(run):
    return {p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".write-test-")}


def _assert_same_weights(a, b, models):
    """Bit-identical weights (and the same step) in two checkpoints."""
    ca, cb = util.load_checkpoint(a), util.load_checkpoint(b)
    assert ca["step"] == cb["step"]
    for key in models:
        wa, wb = ca[key], cb[key]
        assert wa.keys() == wb.keys()
        for name in wa:
            assert torch.equal(wa[name], wb[name]), f"{key}.{name} differs from the uninterrupted run"


def _assert_finite(ckpt, models):
    for key in models:
        for name, t in ckpt[key].items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{key}.{name} is not finite"


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _chain_args(name, tiny_data, vae_run, vqvae_run):
    """(script argv, training flags) of the kill-chain configuration of one trainer."""
    common = ["--preset", "smoke", "--seed", 3, "--steps", STEPS, "--log-every", 1, "--val-every", 1000,
              "--ckpt-every", CKPT]
    if name in ("vae", "vqvae"):
        # The PatchGAN switches on at step 8, so the discriminator and its optimiser are resumed too.
        return ["prestage_train.py"], ["--model", name, "--data", tiny_data, "--disc-start", 8, *common]
    if name == "ldm":
        return ["stable_diffusion.py", "train"], ["--ae", vae_run / "best.pt", *common]
    return ["pixelCNN.py", "train"], ["--ae", vqvae_run / "best.pt", *common]


def _main(script, *argv):
    return MAIN[script[0]]([*script[1:], *map(str, argv)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data, vae_run, vqvae_run):
    """The uninterrupted run of each kill-chain configuration (in-process, built on first use)."""
    done = {}

    def get(name):
        if name not in done:
            script, args = _chain_args(name, tiny_data, vae_run, vqvae_run)
            out = tmp_path_factory.mktemp(f"ref_{name}") / "run"
            _main(script, *args, "--out", out)
            done[name] = out
        return done[name]

    return get


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# 1. SIGKILL at random moments, then --resume: exact continuation


KILL_MODES = ("before-first-checkpoint", "checkpoint-write", "random")


@pytest.mark.parametrize("name", ["vae", "vqvae", "ldm", "pixelcnn"])
def test_sigkill_then_resume_matches_uninterrupted_run(name, tmp_path, reference, tiny_data, vae_run, vqvae_run, cli):
    """Three SIGKILLs per trainer (before the first checkpoint, during a checkpoint write, at a seeded random
    point of the run), each followed by --resume; the finished run equals the uninterrupted one bit for bit."""
    ref = reference(name)
    script, args = _chain_args(name, tiny_data, vae_run, vqvae_run)
    run = tmp_path / "run"
    rng = random.Random(f"kill-{name}")
    kind, models = KIND[name], MODELS[name]
    ckpt_step = None  # step of last.pt, None while there is none
    stale = set()     # temporary files a kill left behind: the next start must remove them
    landed = []
    for trial, mode in enumerate(KILL_MODES + ("finish",)):
        argv = [*script, *args, "--out", run] if trial == 0 else [*script, "--resume", run]
        start = ckpt_step or 0
        job = _Launched(cli, argv, tmp_path, f"{trial}-{mode}")
        proc = job.proc
        if mode != "finish":
            # Training is under way in this process once it has rewound the log (said so on stdout)
            # and logged a step beyond its start.
            if trial > 0:
                assert _wait_for(lambda: re.search(r"^resume", job.out.read_text(), re.M), proc), \
                    job.err.read_text()[-2000:]
            assert _wait_for(lambda: _last_step(run) > start, proc), job.err.read_text()[-2000:]
            if mode == "checkpoint-write":
                # Once a last.pt exists, kill the moment the next checkpoint's temporary file appears
                # (or, should the poll miss it, right after last.pt changes): the old last.pt must survive.
                assert _wait_for(lambda: (run / "last.pt").exists(), proc, interval=0.001)
                before = (run / "last.pt").stat().st_mtime_ns

                def writing():
                    if any(n.startswith(".last.pt.") and n.endswith(".tmp") for n in os.listdir(run)):
                        return True
                    return (run / "last.pt").stat().st_mtime_ns != before

                _wait_for(writing, proc, interval=0.0005)
            elif mode == "random":
                # A seeded random point of the remaining run (in steps, so machine speed does not
                # matter), then a random fraction of a step on top.
                target = rng.randint(_last_step(run), STEPS - 4)
                _wait_for(lambda: _last_step(run) >= target, proc, interval=0.002)
                time.sleep(rng.uniform(0.0, 0.05))
            proc.kill()
        rc, out, err = job.finish()
        assert "Traceback" not in err, err[-3000:]
        # The step count continues from the checkpoint's step (or from 0 when there was none yet).
        if trial > 0:
            if ckpt_step is None:
                assert "no last.pt yet" in out and "starting from step 0" in out, out[-2000:]
            else:
                assert f"resumed {run}/last.pt at step {ckpt_step} " in out, out[-2000:]
        assert not stale & _tmp_files(run), "temporary files of a killed run were left behind"
        if mode == "finish":
            assert rc == 0, err[-3000:]
            break
        if rc == 0:  # finished before the kill landed: nothing left to kill
            landed.append(f"{mode}: missed")
            break
        assert rc == -signal.SIGKILL
        tmp_left = _tmp_files(run)
        landed.append(f"{mode}: step {_last_step(run)}" + (", mid-write" if tmp_left else ""))
        stale = tmp_left
        # last.pt (if any) loads, is one of the scheduled checkpoints and never goes back in time.
        if (run / "last.pt").exists():
            state = util.load_checkpoint(run / "last.pt", kind=kind, flag="--resume")
            assert state["step"] % CKPT == 0 and state["step"] >= start
            _assert_finite(state, models)
            ckpt_step = state["step"]
        else:
            assert ckpt_step is None
        # log.jsonl: every step once, in order (a line cut by the kill is skipped by the reader).
        steps = _loss_steps(run)
        assert steps == list(range(1, len(steps) + 1)) and (ckpt_step or 0) <= len(steps)
    print(f"\nkill trials {name}: " + "; ".join(landed))
    assert len(landed) == len(KILL_MODES) and not any("missed" in t for t in landed), landed
    # The finished run: all steps logged once with the reference's numbers, identical weights.
    assert _loss_steps(run) == list(range(1, STEPS + 1))
    assert _records(run) == _records(ref)
    _assert_same_weights(run / "last.pt", ref / "last.pt", models)
    _assert_same_weights(run / "best.pt", ref / "best.pt", models)
    assert not _tmp_files(run)


def test_resume_without_checkpoint_starts_over_and_clears_leftovers(tmp_path, reference, tiny_data, vae_run, vqvae_run):
    """Deterministic version of a kill before the first checkpoint, in the middle of its write: config.json
    and a partial log exist, no last.pt, a half-written temporary checkpoint. --resume starts from step 0."""
    ref = reference("vae")
    run = _copy_run(ref, tmp_path / "run")
    for name in ("last.pt", "best.pt"):
        (run / name).unlink()
    shutil.rmtree(run / "samples")
    records = util.read_jsonl(run / "log.jsonl")
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]) + '{"step": 4, "loss/re')
    (run / ".last.pt.k1ll3d.tmp").write_bytes((ref / "last.pt").read_bytes()[:5000])
    (run / ".log.jsonl.tmp").write_text("{")
    prestage_train.main(["--resume", str(run)])
    assert not _tmp_files(run)
    assert _loss_steps(run) == list(range(1, STEPS + 1))
    _assert_same_weights(run / "last.pt", ref / "last.pt", MODELS["vae"])
    # A run killed before config.json was written is not a run yet: the error says how to start it.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=rf"no config.json there .*start it again with --out {re.escape(str(empty))}"):
        prestage_train.main(["--resume", str(empty)])
    # best.pt without last.pt cannot continue exactly: a clear error rather than a silent restart.
    (run / "last.pt").unlink()
    with pytest.raises(UserError, match="has best.pt but no last.pt"):
        prestage_train.main(["--resume", str(run)])


# ----------------------------------------------------------------------------------------------
# 2. SIGTERM and SIGINT: save, one message, conventional exit code, exact continuation


def test_sigterm_and_sigint_save_and_resume(tmp_path, reference, tiny_data, vae_run, vqvae_run, cli):
    ref = reference("vae")
    script, args = _chain_args("vae", tiny_data, vae_run, vqvae_run)
    run = tmp_path / "run"
    plan = [("SIGTERM", [signal.SIGTERM], 143), ("SIGINT (Ctrl-C)", [signal.SIGINT], 130),
            # twice, as when both the scheduler and torchrun forward it: still one clean save
            ("SIGTERM", [signal.SIGTERM, signal.SIGTERM], 143)]
    saved = 0
    for i, (label, signals, code) in enumerate(plan):
        argv = [*script, *args, "--out", run] if i == 0 else [*script, "--resume", run]
        job = _Launched(cli, argv, tmp_path, f"sig{i}")
        if i > 0:  # the log is rewound on resume: wait for that before reading it
            assert _wait_for(lambda: re.search(r"^resume", job.out.read_text(), re.M), job.proc)
        assert _wait_for(lambda: _last_step(run) >= saved + 2, job.proc)
        for sig in signals:
            job.proc.send_signal(sig)
        rc, out, err = job.finish()
        assert rc == code, err[-2000:]
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if "received" in line]
        assert len(lines) == 1, err
        m = re.fullmatch(rf"{re.escape(label)} received: saved {re.escape(str(run))}/last\.pt at step (\d+); "
                         rf"continue with --resume {re.escape(str(run))}", lines[0])
        assert m, lines[0]
        step = int(m.group(1))
        assert util.load_checkpoint(run / "last.pt", kind="stage1")["step"] == step > saved
        if i > 0:
            assert f"resumed {run}/last.pt at step {saved} " in out
        saved = step
    rc, out, err = _Launched(cli, [*script, "--resume", run], tmp_path, "sig-finish").finish()
    assert rc == 0 and f"at step {saved} " in out, err[-2000:]
    assert _loss_steps(run) == list(range(1, STEPS + 1))
    _assert_same_weights(run / "last.pt", ref / "last.pt", MODELS["vae"])


# ----------------------------------------------------------------------------------------------
# 3. Checkpoint safety: pickled payloads, truncated and random files, other kinds, other configs


class _Payload:
    """Unpickling this creates the marker file (what a hostile checkpoint would do with a shell)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_files(tmp_path, kind, like):
    """{label: path} of an evil (pickled payload), a truncated and a random-bytes checkpoint."""
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / f"evil_{kind}.pt"
    torch.save({"kind": kind, "config": {}, "x": _Payload(marker)}, evil)
    truncated = tmp_path / f"truncated_{kind}.pt"
    data = Path(like).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / f"noise_{kind}.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return marker, {"evil": evil, "truncated": truncated, "noise": noise}


EXPECT = {"evil": "refused, the file holds pickled code or objects, which are never loaded",
          "truncated": "not a readable checkpoint",
          "noise": "not a readable checkpoint"}


def test_payload_is_live_without_safe_loading(tmp_path):
    """The payload of the tests below really runs under a plain torch.load (so its absence means something)."""
    import pickle
    import zipfile

    marker, files = _hostile_files(tmp_path, "stage1", __file__)
    # Unpickle the checkpoint's data record directly, as an unsafe loader would (the file holds no
    # tensors, so no persistent ids need resolving); this never goes through torch.load at all.
    with zipfile.ZipFile(files["evil"]) as archive:
        record = next(name for name in archive.namelist() if name.endswith("data.pkl"))
        pickle.loads(archive.read(record))
    assert marker.exists()


@pytest.fixture(scope="module")
def stage_two_runs(reference):
    return {"ldm": reference("ldm"), "pixelcnn": reference("pixelcnn")}


def test_hostile_checkpoints_are_refused_for_every_flag(tmp_path, reference, stage_two_runs, vqvae_run, tiny_data):
    """--ckpt, --ae and --resume of every script: a pickled payload is refused and never runs; a truncated
    or random file is 'not a readable checkpoint'. Each names the flag and the file."""
    vae_ref, ldm_ref, pcnn_ref = reference("vae"), stage_two_runs["ldm"], stage_two_runs["pixelcnn"]
    flags = [  # (script, flag, checkpoint kind, a real file of that kind, argv around the file)
        (["prestage_train.py"], "--ckpt", "stage1", vae_ref / "best.pt", lambda f, d: ["--eval-only", "--ckpt", f, "--data", tiny_data]),
        (["stable_diffusion.py", "train"], "--ae", "stage1", vae_ref / "best.pt", lambda f, d: ["--ae", f, "--preset", "smoke", "--out", d / "o"]),
        (["pixelCNN.py", "train"], "--ae", "stage1", vqvae_run / "best.pt", lambda f, d: ["--ae", f, "--preset", "smoke", "--out", d / "o"]),
        (["stable_diffusion.py", "sample"], "--ckpt", "diffusion", ldm_ref / "best.pt", lambda f, d: ["--ckpt", f, "--out", d / "s.png"]),
        (["pixelCNN.py", "sample"], "--ckpt", "pixelcnn", pcnn_ref / "best.pt", lambda f, d: ["--ckpt", f, "--out", d / "s.png"]),
    ]
    tried = 0
    for i, (script, flag, kind, like, argv) in enumerate(flags):
        for bad in ("evil", "truncated", "noise"):
            folder = tmp_path / f"{i}-{bad}"
            folder.mkdir()
            marker, files = _hostile_files(folder, kind, like)
            with pytest.raises(UserError, match=re.escape(f"{flag} {files[bad]}: {EXPECT[bad]}")):
                _main(script, *argv(files[bad], folder))
            assert not marker.exists(), f"the payload ran through {script} {flag}"
            tried += 1
    # --resume: the run's last.pt replaced by each hostile file
    for src, script in ((vae_ref, ["prestage_train.py"]), (ldm_ref, ["stable_diffusion.py", "train"]),
                        (pcnn_ref, ["pixelCNN.py", "train"])):
        kind = util.load_checkpoint(src / "last.pt")["kind"]
        for bad in ("evil", "truncated", "noise"):
            folder = tmp_path / f"{script[0]}-{bad}"
            folder.mkdir()
            run = _copy_run(src, folder / "run")
            marker, files = _hostile_files(folder, kind, src / "last.pt")
            shutil.copy(files[bad], run / "last.pt")
            with pytest.raises(UserError, match=re.escape(f"--resume {run}/last.pt: {EXPECT[bad]}")):
                _main(script, "--resume", run)
            assert not marker.exists(), f"the payload ran through {script} --resume"
            tried += 1
    assert tried == 24


def test_hostile_checkpoint_cli_is_one_line(tmp_path, reference, vae_run, cli):
    """As a user sees it: exit 1, one error line, no traceback, and the payload never ran."""
    marker, files = _hostile_files(tmp_path, "stage1", vae_run / "best.pt")
    run = _copy_run(reference("vae"), tmp_path / "run")
    shutil.copy(files["evil"], run / "last.pt")
    cli.assert_one_line_error(cli.run("prestage_train.py", "--resume", run), "refused", f"{run}/last.pt")
    cli.assert_one_line_error(cli.run("stable_diffusion.py", "train", "--ae", files["evil"], "--preset", "smoke",
                                      "--out", tmp_path / "ldm"), "--ae", "refused")
    cli.assert_one_line_error(cli.run("pixelCNN.py", "train", "--ae", files["truncated"], "--preset", "smoke",
                                      "--out", tmp_path / "pc"), "--ae", "truncated or corrupt")
    assert not marker.exists()


def test_checkpoints_of_other_kinds_and_configs_name_the_difference(tmp_path, reference, stage_two_runs, vae_run, vqvae_run, tiny_data):
    vae_ref, ldm_ref, pcnn_ref = reference("vae"), stage_two_runs["ldm"], stage_two_runs["pixelcnn"]
    # another kind where a stage-one checkpoint is expected, and the reverse
    with pytest.raises(UserError, match="is a 'diffusion' checkpoint, expected stage1"):
        stable_diffusion.main(["train", "--ae", str(ldm_ref / "best.pt"), "--preset", "smoke", "--out", str(tmp_path / "a")])
    with pytest.raises(UserError, match="is a 'pixelcnn' checkpoint, expected stage1"):
        prestage_train.main(["--eval-only", "--ckpt", str(pcnn_ref / "best.pt")])
    with pytest.raises(UserError, match="is a 'stage1' checkpoint, expected diffusion"):
        stable_diffusion.main(["sample", "--ckpt", str(vae_ref / "best.pt"), "--out", str(tmp_path / "s.png")])
    with pytest.raises(UserError, match="is a VAE checkpoint; the PixelCNN models discrete codes"):
        pixelCNN.main(["train", "--ae", str(vae_run / "best.pt"), "--preset", "smoke", "--out", str(tmp_path / "b")])
    # a run directory of another stage, and a last.pt of another kind inside a run
    with pytest.raises(UserError, match="a 'ldm' run, not a 'stage1' run"):
        prestage_train.main(["--resume", str(ldm_ref)])
    with pytest.raises(UserError, match="a 'stage1' run, not a 'pixelcnn' run"):
        pixelCNN.main(["train", "--resume", str(vae_ref)])
    run = _copy_run(vae_ref, tmp_path / "vae_with_ldm_ckpt")
    shutil.copy(ldm_ref / "last.pt", run / "last.pt")
    with pytest.raises(UserError, match="is a 'diffusion' checkpoint, expected stage1"):
        prestage_train.main(["--resume", str(run)])
    # a model flag that differs from config.json
    with pytest.raises(UserError, match=r"cannot change on resume: --ch 32 \(run has 16\)"):
        prestage_train.main(["--resume", str(vae_ref), "--ch", "32"])
    with pytest.raises(UserError, match=r"cannot change on resume: --model-channels 32 \(run has 16\)"):
        stable_diffusion.main(["train", "--resume", str(ldm_ref), "--model-channels", "32"])
    with pytest.raises(UserError, match=r"cannot change on resume: --hidden 32 \(run has 16\)"):
        pixelCNN.main(["train", "--resume", str(pcnn_ref), "--hidden", "32"])
    # a last.pt of the same kind but another run (a VQ-VAE's inside a VAE run): names what differs
    vq_ref = reference("vqvae")
    run = _copy_run(vae_ref, tmp_path / "vae_with_vq_ckpt")
    shutil.copy(vq_ref / "last.pt", run / "last.pt")
    with pytest.raises(UserError, match=r"written with other settings than this run \(.*model vqvae -> vae"):
        prestage_train.main(["--resume", str(run)])
    # config.json edited by hand so the model no longer fits last.pt
    run = _copy_run(vae_ref, tmp_path / "vae_edited")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, ch=24)))
    with pytest.raises(UserError, match=r"other settings than this run \(ch 16 -> 24\)"):
        prestage_train.main(["--resume", str(run)])
    (run / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is unreadable"):
        prestage_train.main(["--resume", str(run)])


def test_stage_two_resume_refuses_a_changed_stage_one_file(tmp_path, vae_run):
    """The stage-one file a diffusion run encodes with was replaced: resuming would train on other latents."""
    ae = tmp_path / "ae.pt"
    shutil.copy(vae_run / "best.pt", ae)
    run = tmp_path / "ldm"
    stable_diffusion.main(["train", "--ae", str(ae), "--preset", "smoke", "--steps", "4", "--stop-at", "2",
                           "--out", str(run)])
    state = util.load_checkpoint(ae)
    state.pop("_path")
    state["model"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    util.save_checkpoint(state, ae)  # e.g. stage one retrained into the same path
    with pytest.raises(UserError, match=r"other settings than this run \(ae_sha256 "):
        stable_diffusion.main(["train", "--resume", str(run)])


# ----------------------------------------------------------------------------------------------
# 4. Bad data: found at start-up (one line, before any training step) or converted and noted


@pytest.fixture
def data_copy(tmp_path, tiny_data):
    return _copy_run(tiny_data, tmp_path / "data")


def _train_one_step(data, out, *extra):
    prestage_train.main(["--preset", "smoke", "--data", str(data), "--out", str(out), "--steps", "1",
                         "--val-max", "8", *map(str, extra)])


def test_corrupt_png_among_good_ones_fails_before_training(tmp_path, data_copy, cli):
    bad = sorted((data_copy / "keras_png_slices_train").glob("*.png"))[40]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated mid-file
    out = tmp_path / "run"
    proc = cli.run("prestage_train.py", "--preset", "smoke", "--data", data_copy, "--out", out)
    cli.assert_one_line_error(proc, f"{bad}: unreadable or corrupt image")
    assert not out.exists() and "it/s" not in proc.stdout  # no run directory, no training step
    bad.write_bytes(os.urandom(300))  # random bytes
    with pytest.raises(UserError, match=re.escape(f"{bad}: unreadable or corrupt image")):
        _train_one_step(data_copy, out)
    assert not out.exists()


def test_empty_split_folder_fails_before_training(tmp_path, data_copy):
    for f in (data_copy / "keras_png_slices_validate").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="keras_png_slices_validate: the validate split has no images"):
        _train_one_step(data_copy, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_16bit_rgb_and_other_sizes_are_converted_and_noted(tmp_path, data_copy, capsys):
    train = sorted((data_copy / "keras_png_slices_train").glob("*.png"))
    gray = [np.asarray(Image.open(p)) for p in train[:4]]
    Image.fromarray(gray[0].astype(np.uint16) * 257).save(train[0])                 # 16-bit
    Image.fromarray(np.stack([gray[1]] * 3, axis=-1)).save(train[1])                 # RGB
    Image.fromarray(np.asarray(Image.fromarray(gray[2]).resize((64, 64)))).save(train[2])  # another size
    Image.fromarray(np.pad(gray[3], ((0, 0), (8, 8)))).save(train[3])                # not square
    out = tmp_path / "run"
    _train_one_step(data_copy, out)
    text = capsys.readouterr().out
    assert "were 16-bit: scaled by each image's own maximum to 8-bit" in text
    assert "were RGB: converted to 8-bit grayscale" in text
    assert re.search(r"note \(train\): mixed slice sizes on disk: 32x32 \(126\), .*64x64 \(1\).*resized to 32x32", text)
    assert "32x48 (1)" in text
    assert util.load_checkpoint(out / "last.pt")["step"] == 1


def _volume(four_d=False):
    x, y, z = np.indices((20, 24, 16), dtype=np.float32)
    vol = np.where(((x - 9.5) / 8) ** 2 + ((y - 11.5) / 10) ** 2 + ((z - 7.5) / 7) ** 2 <= 1, 100 + 5 * z, 0)
    vol = vol.astype(np.float32)
    return np.stack([vol, np.zeros_like(vol)], axis=-1) if four_d else vol


def test_nifti_4d_is_noted_and_5d_fails_before_training(tmp_path, capsys):
    data = tmp_path / "nifti"
    data.mkdir()
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(_volume(four_d=True), np.eye(4)), str(data / f"{name}.nii.gz"))
    out = tmp_path / "run"
    _train_one_step(data, out)
    text = capsys.readouterr().out
    assert re.search(r"note \(\w+\): .*4-D volume: used the first volume", text)
    assert util.load_checkpoint(out / "last.pt")["step"] == 1
    five = np.stack([_volume(four_d=True)] * 2, axis=-1)
    for name in ("a", "b", "c"):
        nib.save(nib.Nifti1Image(five, np.eye(4)), str(data / f"{name}.nii.gz"))
    with pytest.raises(UserError, match=r"[abc]\.nii\.gz: expected a 3-D volume, found shape 20x24x16x2x2"):
        _train_one_step(data, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


# ----------------------------------------------------------------------------------------------
# 5. Outputs: unwritable places are reported before training, runs are never clobbered


def test_unwritable_output_is_reported_before_training(tmp_path, tiny_data, vae_run, vqvae_run, cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    with pytest.raises(UserError, match=re.escape(f"--out {blocker}/run: cannot write there")):
        _train_one_step(tiny_data, blocker / "run")
    with pytest.raises(UserError, match=re.escape(f"--out {blocker}: is a file, not a folder")):
        _train_one_step(tiny_data, blocker)
    with pytest.raises(UserError, match=re.escape(f"--out {blocker}/ldm: cannot write there")):
        stable_diffusion.main(["train", "--ae", str(vae_run / "best.pt"), "--preset", "smoke", "--out", str(blocker / "ldm")])
    with pytest.raises(UserError, match=re.escape(f"--out {blocker}/pc: cannot write there")):
        pixelCNN.main(["train", "--ae", str(vqvae_run / "best.pt"), "--preset", "smoke", "--out", str(blocker / "pc")])
    assert blocker.read_text() == "keep"
    cli.assert_one_line_error(cli.run("prestage_train.py", "--preset", "smoke", "--data", tiny_data, "--out",
                                      blocker), "is a file, not a folder")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: a read-only mode does not stop root from writing "
                           "(the under-a-file case above covers unwritable outputs)")
def test_read_only_output_is_reported_before_training(tmp_path, tiny_data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(UserError, match="cannot write there"):
            _train_one_step(tiny_data, locked / "run")
    finally:
        locked.chmod(0o755)


def test_existing_runs_are_never_overwritten(tmp_path, reference, stage_two_runs, tiny_data, vqvae_run):
    vae = _copy_run(reference("vae"), tmp_path / "vae")
    ldm = _copy_run(stage_two_runs["ldm"], tmp_path / "ldm")
    pcnn = _copy_run(stage_two_runs["pixelcnn"], tmp_path / "pcnn")
    before = {run: _snapshot(run) for run in (vae, ldm, pcnn)}
    with pytest.raises(UserError, match="a run already exists there; pass --resume"):
        _train_one_step(tiny_data, vae)
    # Another stage-one file than the run's: a latent/code cache of the existing run would be rebuilt.
    other_vq = tmp_path / "other_vq.pt"
    state = util.load_checkpoint(vqvae_run / "best.pt")
    state.pop("_path")
    util.save_checkpoint(dict(state, note="other file"), other_vq)
    with pytest.raises(UserError, match="a run already exists there"):
        stable_diffusion.main(["train", "--ae", str(other_vq), "--preset", "smoke", "--out", str(ldm)])
    with pytest.raises(UserError, match="a run already exists there"):
        pixelCNN.main(["train", "--ae", str(other_vq), "--preset", "smoke", "--out", str(pcnn)])
    for run, files in before.items():
        assert _snapshot(run) == files, f"{run} changed"


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, tiny_data, cli):
    """A checkpoint write that runs out of space (a file-size limit stands in for a full disk): one error line,
    the previous last.pt byte for byte, no temporary file left."""
    import resource

    run = tmp_path / "run"
    prestage_train.main(["--preset", "smoke", "--data", str(tiny_data), "--out", str(run), "--steps", "8",
                         "--stop-at", "4", "--ckpt-every", "4", "--val-every", "1000", "--disc-start", "100"])
    before = (run / "last.pt").read_bytes()

    def small_files():  # in the child only: files may not grow past half a checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = cli.run("prestage_train.py", "--resume", run, preexec_fn=small_files)
    err = cli.assert_one_line_error(proc, "could not write the checkpoint", "is the disk full?")
    # (at the last step validation writes best.pt first, so that is the write that fails)
    assert re.match(rf"error: {re.escape(str(run))}/(best|last)\.pt: .*any previous (best|last)\.pt is unchanged", err)
    assert (run / "last.pt").read_bytes() == before and not _tmp_files(run)
    assert util.load_checkpoint(run / "last.pt")["step"] == 4


# ----------------------------------------------------------------------------------------------
# 6. Numbers: a non-finite loss or weight stops the run and keeps the last good checkpoint


@pytest.mark.parametrize("name", ["vae", "ldm", "pixelcnn"])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(name, tmp_path, tiny_data, vae_run, vqvae_run):
    script, _ = _chain_args(name, tiny_data, vae_run, vqvae_run)
    extra = {"vae": ["--data", tiny_data, "--disc-start", 100], "ldm": ["--ae", vae_run / "best.pt"],
             "pixelcnn": ["--ae", vqvae_run / "best.pt"]}[name]
    out = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLoss) as err:
        _main(script, "--preset", "smoke", *extra, "--out", out, "--lr", "1e30", "--steps", 30,
              "--ckpt-every", 1, "--log-every", 1, "--val-every", 1000)
    m = re.fullmatch(r"non-finite loss at step (\d+): (loss/\w+) = (nan|inf|-inf); training stopped and the last "
                     rf"good checkpoint {re.escape(str(out))}/last\.pt is kept \(try a lower --lr\)", str(err.value))
    assert m, str(err.value)
    bad = int(m.group(1))
    kept = util.load_checkpoint(out / "last.pt", kind=KIND[name])
    assert kept["step"] == bad - 1 >= 1  # the checkpoint saved just before the bad step
    _assert_finite(kept, MODELS[name] if name != "vae" else ("model",))
    assert _loss_steps(out)[-1] == bad - 1  # the bad step was never logged


def test_non_finite_weights_are_never_saved(tmp_path, tiny_data, monkeypatch):
    """An update can break the weights while every loss term is still finite (here: a poisoned step 4);
    the checkpoint of step 4 must not replace the good one of step 3."""
    original = prestage_train.StageOneTask.train_step

    def poisoned(self, batch, step):
        logs = original(self, batch, step)
        if step == 3:
            with torch.no_grad():
                self.model.decoder.last_layer.fill_(float("nan"))
        return logs

    monkeypatch.setattr(prestage_train.StageOneTask, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(trainer.NonFiniteLoss, match=r"non-finite weights at step 4: model\.decoder\.\S+; training "
                                                    r"stopped and the last good checkpoint .*last\.pt is kept"):
        _train_one_step(tiny_data, out, "--steps", 8, "--ckpt-every", 1, "--val-every", 1000, "--disc-start", 100)
    kept = util.load_checkpoint(out / "last.pt")
    assert kept["step"] == 3
    _assert_finite(kept, ("model",))


@pytest.mark.parametrize("flag, value", [("--ckpt-every", "0"), ("--log-every", "-1"), ("--steps", "0"),
                                         ("--batch-size", "0"), ("--lr", "nan"), ("--lr", "-1")])
def test_loop_flags_that_cannot_work_are_refused_at_start(tmp_path, tiny_data, flag, value):
    with pytest.raises(UserError, match=re.escape(f"{flag} {value}")):
        _train_one_step(tiny_data, tmp_path / "run", flag, value)
    assert not (tmp_path / "run").exists()
