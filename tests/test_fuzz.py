"""Fuzzing every kind of file the scripts read, each mutated from a real one made by a smoke run.

The property, for every mutated input: the command either works, or prints exactly one line that starts
with `error: ` and names the file or the flag, and exits non-zero; it never prints a traceback (no exception
escapes `util.run_cli`), never runs pickled code, and leaves every existing run directory byte-identical.

Hypothesis draws the mutations, derandomised (the same inputs on every run, as CI needs). The commands run
in this process (a subprocess per input would spend its time importing torch). FUZZ_SCALE=N multiplies the
examples per file type: the default run tries about 560 inputs; `FUZZ_SCALE=10` about 5,600.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_fuzz.py              # the suite's share
    FUZZ_SCALE=10 OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_fuzz.py -s   # the long run
"""
import collections
import contextlib
import copy
import gzip
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from PIL import Image

import dataset
import logger
import pixelCNN
import prestage_train
import stable_diffusion
import util

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
COUNTS = collections.Counter()  # inputs tried per file type, printed at the end of the module


def fuzz(examples):
    """Hypothesis settings: `examples` x FUZZ_SCALE inputs, derandomised, no deadline, no example database.
    A failure is reported as drawn, unshrunk (FUZZ_SHRINK=1 shrinks it): each input runs a script, and
    shrinking (and its line tracing) would take minutes."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("FUZZ_SHRINK") == "1" else [])
    return settings(max_examples=max(1, round(examples * SCALE)), derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), phases=phases)


# ----------------------------------------------------------------------------------------------
# Running a script and checking the property


def run(main, argv):
    """`util.run_cli(main, argv)` in this process: (exit code, stdout, stderr). Any other exception escapes:
    that is a traceback a user would see."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            util.run_cli(main, [str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def check(kind, result, *names):
    """The property for one input of file type `kind`: it worked, or one `error: ` line naming a name."""
    COUNTS[kind] += 1
    code, _, err = result
    if code == 0:
        return
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert any(str(n) in lines[0] for n in names), (names, lines[0])


def snapshot(*folders):
    """{path: sha256} of every file under the folders (the run directories that must stay unchanged)."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data, vqvae_run):
    """A smoke latent-diffusion and PixelCNN run on the smoke VQ-VAE; every run is checked unchanged at the end."""
    root = tmp_path_factory.mktemp("fuzz_runs")
    cadence = ["--steps", 6, "--log-every", 2, "--val-every", 3, "--ckpt-every", 3]
    for script, name in ((stable_diffusion, "ldm"), (pixelCNN, "pcnn")):
        code, _, err = run(script.main, ["train", "--ae", vqvae_run / "best.pt", "--preset", "smoke",
                                         "--out", root / name, *cadence])
        assert code == 0, err
    found = dict(vq=vqvae_run, ldm=root / "ldm", pcnn=root / "pcnn", data=tiny_data)
    before = snapshot(*found.values())
    yield found
    assert snapshot(*found.values()) == before


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    """Print how many inputs each file type got (run with -s to see it)."""
    yield
    print("\nfuzzed inputs per file type:", dict(sorted(COUNTS.items())), "total", sum(COUNTS.values()))


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    """A file that pickled payloads would create if anything ever unpickled them."""
    path = tmp_path_factory.mktemp("payload") / "ran"
    yield path
    assert not path.exists(), "a pickled payload was executed"


class Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def scratch_copy(src, dst):
    """A fresh copy of a run directory or a file to mutate."""
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    (shutil.copytree if Path(src).is_dir() else shutil.copyfile)(src, dst)
    return dst


# ----------------------------------------------------------------------------------------------
# Mutations


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=5)
ODD = st.sampled_from([0, -1, 1, 3, 10**12, 0.5, -0.5, 1e-30, float("inf"), float("nan"), "", "x", True, None,
                       [], {}, [1, "a"]])


@st.composite
def mutated_dict(draw, base, depth=2):
    """`base` with one to three keys dropped, renamed, retyped, set to odd values or nested; or any JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    value = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(value, dict) or not value:
            break
        key = draw(st.sampled_from(sorted(value, key=str)))
        op = draw(st.sampled_from(["drop", "rename", "json", "odd", "nest", "inner"]))
        if op == "drop":
            value.pop(key)
        elif op == "rename":
            value[f"{key}_"] = value.pop(key)
        elif op == "json":
            value[key] = draw(JSON)
        elif op == "odd":
            value[key] = draw(ODD)
        elif op == "nest":
            value[key] = draw(st.sampled_from([[value[key]], {"value": value[key]}]))
        elif isinstance(value[key], dict) and depth > 0:
            value[key] = draw(mutated_dict(value[key], depth - 1))
    return value


def tensor_mutation(draw, t):
    """A tensor of another shape, dtype or with non-finite values."""
    op = draw(st.sampled_from(["shape", "dtype", "nan", "empty", "scalar"]))
    if op == "shape":
        return torch.zeros(*[s + draw(st.integers(1, 3)) for s in t.shape] or [2])
    if op == "dtype":
        return t.to(draw(st.sampled_from([torch.int64, torch.bool, torch.float64, torch.uint8])))
    if op == "nan":
        return torch.full_like(t, float("nan")) if t.is_floating_point() else t.float() * float("nan")
    return torch.zeros(0) if op == "empty" else torch.tensor(3.0)


BYTE_OPS = ["truncate", "bytes", "flip"]
CHECKPOINT_OPS = ["keys", "tensor", "config", "kind", "payload", *BYTE_OPS]


@st.composite
def mutated_checkpoint(draw, path, marker, ops=CHECKPOINT_OPS):
    """Bytes of a mutated checkpoint: a state-dict change, a config change, cut or random bytes, or a payload."""
    raw = Path(path).read_bytes()
    op = draw(st.sampled_from(ops))
    if op == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if op == "bytes":
        return draw(st.binary(max_size=64))
    if op == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if op == "keys":
        state = draw(mutated_dict({k: v for k, v in state.items()}, depth=0))
    elif op == "tensor":
        weights = state[draw(st.sampled_from(["model", "ema"] if "ema" in state else ["model"]))]
        key = draw(st.sampled_from(sorted(weights)))
        weights[key] = tensor_mutation(draw, weights[key])
    elif op == "config":
        name = draw(st.sampled_from([k for k in ("config", "model_config") if k in state]))
        state[name] = draw(mutated_dict(state[name]))
    elif op == "kind":
        state["kind"] = draw(st.sampled_from(["stage1", "diffusion", "pixelcnn", "cache", "", 3, None]))
    else:
        state[draw(st.sampled_from(["model", "config", "extra"]))] = Payload(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# config.json


@fuzz(90)
@given(data=st.data())
def test_fuzz_config_json(runs, tmp_path_factory, data):
    work = scratch_copy(runs["vq"], tmp_path_factory.getbasetemp() / "fuzz_config")
    config = json.loads((work / "config.json").read_text())
    (work / "config.json").write_text(json.dumps(data.draw(mutated_dict(config))))
    before = snapshot(work)
    result = run(prestage_train.main, ["--resume", work, "--stop-at", 9])
    check("config.json", result, "--resume", "config.json")
    if result[0] != 0:
        assert snapshot(work) == before


# ----------------------------------------------------------------------------------------------
# Checkpoints: stage one (as --eval-only --ckpt, and as a stage-two --ae) and stage two (--ckpt)


@fuzz(70)
@given(data=st.data())
def test_fuzz_stage_one_checkpoint(runs, marker, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz_stage1.pt"
    path.write_bytes(data.draw(mutated_checkpoint(runs["vq"] / "best.pt", marker)))
    if data.draw(st.booleans()):
        argv = ["--eval-only", "--ckpt", path, "--split", "test", "--data", runs["data"]]
        check("checkpoint (stage one)", run(prestage_train.main, argv), "--ckpt", path)
    else:
        argv = ["sample", "--ckpt", runs["pcnn"] / "best.pt", "--ae", path, "--n", 1, "--z", "0", "--no-tissue-maps",
                "--out", path.with_suffix(".png")]
        check("checkpoint (stage one)", run(pixelCNN.main, argv), "--ae", path)


@fuzz(60)
@given(data=st.data())
def test_fuzz_diffusion_checkpoint(runs, marker, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz_ldm.pt"
    path.write_bytes(data.draw(mutated_checkpoint(runs["ldm"] / "best.pt", marker)))
    argv = ["sample", "--ckpt", path, "--n", 1, "--z", "0,3", "--steps", 2, "--no-tissue-maps",
            "--out", path.with_suffix(".png")]
    check("checkpoint (diffusion)", run(stable_diffusion.main, argv), "--ckpt", path, "--ae")


@fuzz(60)
@given(data=st.data())
def test_fuzz_pixelcnn_checkpoint(runs, marker, tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz_pcnn.pt"
    path.write_bytes(data.draw(mutated_checkpoint(runs["pcnn"] / "best.pt", marker)))
    argv = ["sample", "--ckpt", path, "--n", 1, "--z", "0,3", "--no-tissue-maps", "--out", path.with_suffix(".png")]
    check("checkpoint (PixelCNN)", run(pixelCNN.main, argv), "--ckpt", path, "--ae")


# ----------------------------------------------------------------------------------------------
# Stage-two caches (read on resume)


@fuzz(30)
@given(data=st.data())
def test_fuzz_stage_two_cache(runs, marker, tmp_path_factory, data):
    work = scratch_copy(runs["ldm"], tmp_path_factory.getbasetemp() / "fuzz_cache")
    cache = torch.load(work / "latents.pt", weights_only=True)
    op = data.draw(st.sampled_from(["keys", "tensor", "bytes", "payload"]))
    if op == "bytes":
        (work / "latents.pt").write_bytes(data.draw(mutated_checkpoint(runs["ldm"] / "latents.pt", marker, BYTE_OPS)))
    else:
        if op == "keys":
            cache = data.draw(mutated_dict(cache, depth=0))
        elif op == "tensor":
            key = data.draw(st.sampled_from(["train", "validate", "train_z", "validate_z"]))
            cache[key] = tensor_mutation(data.draw, cache[key])
        else:
            cache["train"] = Payload(marker)
        torch.save(cache, work / "latents.pt")
    check("stage-two cache", run(stable_diffusion.main, ["train", "--resume", work, "--stop-at", 7]),
          "--resume", "latents.pt")


# ----------------------------------------------------------------------------------------------
# log.jsonl (logger.py, and the rewind on resume)


@fuzz(50)
@given(data=st.data())
def test_fuzz_log_jsonl(runs, tmp_path_factory, data):
    work = tmp_path_factory.getbasetemp() / "fuzz_log"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    lines = (runs["ldm"] / "log.jsonl").read_bytes().splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(lines)))
        op = data.draw(st.sampled_from(["garbage", "json", "cut", "drop", "nan"]))
        if op == "garbage":
            lines.insert(at, data.draw(st.binary(max_size=40)) + b"\n")
        elif op == "json":
            lines.insert(at, json.dumps(data.draw(JSON)).encode() + b"\n")
        elif op == "cut" and lines:
            lines[-1] = lines[-1][:data.draw(st.integers(0, len(lines[-1])))]
        elif op == "drop" and lines:
            lines.pop(min(at, len(lines) - 1))
        elif op == "nan":
            lines.insert(at, b'{"step": 4, "loss/diffusion": NaN, "val/loss": Infinity, "lr": "x"}\n')
    (work / "log.jsonl").write_bytes(b"".join(lines))
    check("log.jsonl", run(logger.main, [work, "--out", work / "curves.png"]), "log.jsonl", work)
    util.JsonlLogger(work / "log.jsonl").truncate_after(3)  # what --resume does with the file


# ----------------------------------------------------------------------------------------------
# Data: PNG slices and NIfTI volumes (read before any training: --dry-run)


def png_bytes(draw):
    """Bytes of a broken or unusual PNG: cut, random, other modes, 0-pixel or huge declared sizes."""
    op = draw(st.sampled_from(["truncate", "random", "mode", "empty", "huge", "text"]))
    buffer = io.BytesIO()
    if op == "mode":
        mode = draw(st.sampled_from(["RGBA", "I;16", "1", "P", "LA"]))  # (Pillow 13 writes no mode-"I" PNG)
        Image.new(mode, (draw(st.integers(1, 40)), draw(st.integers(1, 40)))).save(buffer, format="PNG")
        return buffer.getvalue()
    Image.new("L", (32, 32), 100).save(buffer, format="PNG")
    raw = buffer.getvalue()
    if op == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if op == "random":
        return draw(st.binary(max_size=80))
    if op == "text":
        return b"not an image at all\n"
    # width/height live at bytes 16..24 of the IHDR chunk; a wrong CRC follows, as in a damaged file
    size = 0 if op == "empty" else draw(st.sampled_from([70000, 2**31 - 1]))
    return raw[:16] + size.to_bytes(4, "big") + size.to_bytes(4, "big") + raw[24:]


@fuzz(60)
@given(data=st.data())
def test_fuzz_png_slices(runs, tmp_path_factory, data):
    work = scratch_copy(runs["data"], tmp_path_factory.getbasetemp() / "fuzz_png")
    files = sorted((work / "keras_png_slices_train").glob("*.png")) + sorted(
        (work / "keras_png_slices_validate").glob("*.png"))
    victim = data.draw(st.sampled_from(files))
    victim.write_bytes(png_bytes(data.draw))
    result = run(prestage_train.main, ["--data", work, "--preset", "smoke", "--dry-run"])
    check("PNG slice", result, victim.name, "--data")


def nifti_volume(draw, path):
    """Write a broken or unusual NIfTI volume to `path`."""
    op = draw(st.sampled_from(["dims", "nonfinite", "zero", "header", "constant", "dtype", "affine", "tiny"]))
    shape, affine = (20, 24, 16), np.diag([1.0, 1.0, 1.2, 1.0])
    volume = np.random.default_rng(0).random(shape).astype(np.float32)
    if op == "header":
        raw = gzip.decompress(path.read_bytes()) if path.exists() else b""
        data = bytearray(raw or b"\0" * 352)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, min(len(data), 352) - 1))] = draw(st.integers(0, 255))
        path.write_bytes(gzip.compress(bytes(data)[:draw(st.integers(0, len(data)))]))
        return
    if op == "dims":
        volume = np.ones(draw(st.sampled_from([(20, 24), (20, 24, 16, 3), (4, 4, 4, 2, 2), (20,)])), np.float32)
    elif op == "nonfinite":
        volume[draw(st.sampled_from([slice(None), slice(0, 3)]))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif op == "zero":
        volume = np.zeros(draw(st.sampled_from([(0, 24, 16), (20, 0, 16), (20, 24, 0)])), np.float32)
    elif op == "constant":
        volume = np.full(shape, draw(st.sampled_from([0.0, 5.0])), np.float32)
    elif op == "dtype":
        # (no int64: nibabel refuses to write it without an explicit header dtype)
        volume = (volume * 200).astype(draw(st.sampled_from([np.uint8, np.int16, np.float64, np.int32])))
    elif op == "affine":
        affine = draw(st.sampled_from([np.diag([1e9, 1e-9, 1.0, 1.0]), np.array([[1.0, 5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
                                       np.diag([-1.0, -1.0, -3.0, 1.0])]))
    else:
        volume = np.ones((1, 1, draw(st.integers(1, 3))), np.float32)
    nib.save(nib.Nifti1Image(volume, affine), path)


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory):
    """Ten small NIfTI volumes: a bright ellipsoid of brain in a dark field."""
    folder = tmp_path_factory.mktemp("nifti")
    zz, yy, xx = np.mgrid[0:20, 0:24, 0:16]
    for i in range(10):
        brain = (((zz - 10) / 8.0) ** 2 + ((yy - 12) / (9.0 + i % 3)) ** 2 + ((xx - 8) / 6.0) ** 2) < 1
        volume = brain * (100 + 10 * np.random.default_rng(i).random(brain.shape))
        nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([1.0, 1.0, 1.2, 1.0])), folder / f"s{i:02d}.nii.gz")
    return folder


@fuzz(40)
@given(data=st.data())
def test_fuzz_nifti_volumes(nifti_folder, tmp_path_factory, data):
    work = scratch_copy(nifti_folder, tmp_path_factory.getbasetemp() / "fuzz_nifti")
    victim = work / f"s{data.draw(st.integers(0, 9)):02d}.nii.gz"
    nifti_volume(data.draw, victim)
    result = run(prestage_train.main, ["--data", work, "--preset", "smoke", "--dry-run"])
    check("NIfTI volume", result, victim.name, "--data")


# ----------------------------------------------------------------------------------------------
# Command-line values


Z_SPEC = st.text(alphabet="0123456789.,- x", max_size=7)
NUMBER = st.one_of(st.integers(-5, 5), st.sampled_from(["nan", "inf", "-inf", "1e9", "0.5", "-0.5", "x", ""]))


@fuzz(100)
@given(data=st.data())
def test_fuzz_cli_values(runs, tmp_path_factory, data):
    work = tmp_path_factory.getbasetemp() / "fuzz_cli"
    work.mkdir(exist_ok=True)
    (work / "a_file").write_text("x")
    out = data.draw(st.sampled_from([work / "s.png", work / "a_file" / "s.png", work, work / "new" / "s.png"]))
    target = data.draw(st.sampled_from(["pixelcnn", "diffusion", "stage1"]))
    if target == "pixelcnn":
        argv = ["sample", "--ckpt", data.draw(st.sampled_from([runs["pcnn"] / "best.pt", runs["pcnn"], work,
                                                               work / "missing.pt"])),
                "--z", data.draw(Z_SPEC), "--n", data.draw(NUMBER), "--guidance", data.draw(NUMBER),
                "--temperature", data.draw(NUMBER), "--batch-size", data.draw(NUMBER), "--out", out]
        main = pixelCNN.main
    elif target == "diffusion":
        argv = ["sample", "--ckpt", runs["ldm"] / "best.pt", "--z", data.draw(Z_SPEC), "--n", 1,
                "--steps", data.draw(NUMBER), "--eta", data.draw(NUMBER), "--clip-x0", data.draw(NUMBER),
                "--sampler", data.draw(st.sampled_from(["ddim", "ddpm", "dpmpp", "euler"])), "--out", out]
        main = stable_diffusion.main
    else:
        flag = data.draw(st.sampled_from(["--size", "--steps", "--batch-size", "--lr", "--ch-mult", "--ch",
                                          "--n-embed", "--dropout", "--kl-cycles", "--val-max", "--disc-start"]))
        model = "vae" if flag == "--kl-cycles" else "vqvae"  # each flag with the model kind it applies to
        argv = ["--data", runs["data"], "--preset", "smoke", "--model", model, flag, data.draw(NUMBER),
                "--out", out, "--dry-run"]
        main = prestage_train.main
    argv = [a for a in argv if a != ""] if data.draw(st.booleans()) else argv
    check("command-line value", run(main, argv), "--", str(work))


# ----------------------------------------------------------------------------------------------
# Regression tests: the cases the issue named, and what the fuzzer found


@pytest.mark.parametrize("config, message", [
    ({}, "config.json has no preset name"),
    ({"preset": "smoke"}, "config.json has no stage name"),
    ({"preset": 3, "model": "vae"}, "config.json has no preset name"),
    ({"preset": "smoke", "stage": "stage1", "size": "64"}, "config.json has size = \"64\", which must be a whole number"),
    ({"preset": "smoke", "stage": "stage1", "ckpt_every": None}, "config.json has ckpt_every = null, which must be"),
])
def test_resume_config_of_the_wrong_shape_is_one_line(runs, tmp_path, config, message):
    work = scratch_copy(runs["vq"], tmp_path / "run")
    (work / "config.json").write_text(json.dumps(config))
    before = snapshot(work)
    code, _, err = run(prestage_train.main, ["--resume", work])
    assert code == 1 and err.count("\n") == 1 and f"error: --resume {work}: {message}" in err, err
    assert snapshot(work) == before


def test_pickled_objects_are_named_as_such_and_never_run(runs, marker, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "stage1", "model": Payload(marker)}, path)
    code, _, err = run(prestage_train.main, ["--eval-only", "--ckpt", path, "--data", runs["data"]])
    assert code == 1 and err == (f"error: --ckpt {path}: refused, the file holds pickled code or objects, which are "
                                 f"never loaded (only tensors and plain values are)\n")


def test_a_checkpoint_config_of_wrong_types_is_one_line(runs, tmp_path):
    state = torch.load(runs["ldm"] / "best.pt", weights_only=True)
    state["config"]["latent_shape"] = [4, "16"]
    torch.save(state, tmp_path / "bad.pt")
    code, _, err = run(stable_diffusion.main, ["sample", "--ckpt", tmp_path / "bad.pt", "--out", tmp_path / "s.png"])
    assert code == 1 and err.startswith(f"error: --ckpt {tmp_path / 'bad.pt'}: its config has latent_shape = ")


def test_log_lines_that_are_not_utf8_or_not_objects_are_skipped(tmp_path):
    (tmp_path / "log.jsonl").write_bytes(b'{"step": 2, "loss/x": 1.0}\n\xf5\xff\n[1, 2]\n3\n{"step": 4, "loss/x": 0.5}\n{"st')
    assert [r["step"] for r in util.read_jsonl(tmp_path / "log.jsonl")] == [2, 4]
    util.JsonlLogger(tmp_path / "log.jsonl").truncate_after(3)
    assert util.read_jsonl(tmp_path / "log.jsonl") == [{"step": 2, "loss/x": 1.0}]


def test_a_broken_cache_with_the_right_hash_is_rebuilt(runs, tmp_path):
    work = scratch_copy(runs["ldm"], tmp_path / "run")
    cache = torch.load(work / "latents.pt", weights_only=True)
    cache["data"] = ["not", "a", "path"]
    torch.save(cache, work / "latents.pt")
    code, out, err = run(stable_diffusion.main, ["train", "--resume", work])
    assert code == 0 and "latent cache: encoded" in out, err
    assert isinstance(torch.load(work / "latents.pt", weights_only=True)["data"], str)


def test_library_messages_with_line_breaks_print_as_one_line(nifti_folder, tmp_path):
    work = scratch_copy(nifti_folder, tmp_path / "nifti")
    victim = work / "s03.nii.gz"
    victim.write_bytes(victim.read_bytes()[:300])  # nibabel's text for this has a line break in it
    code, _, err = run(prestage_train.main, ["--data", work, "--preset", "smoke", "--dry-run"])
    assert code == 1 and err.count("\n") == 1 and str(victim) in err, err


def test_an_affine_with_absurd_voxel_sizes_is_refused(nifti_folder, tmp_path):
    work = scratch_copy(nifti_folder, tmp_path / "nifti")
    victim = work / "s04.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 24, 16), np.float32), np.diag([1e9, 1e-9, 1.0, 1.0])), victim)
    code, _, err = run(prestage_train.main, ["--data", work, "--preset", "smoke", "--dry-run"])
    assert code == 1 and f"{victim}: in-plane voxel size" in err and "is not that of an MRI volume" in err, err


def test_bad_flags_are_one_line_not_a_usage_block(runs, tmp_path):
    code, _, err = run(pixelCNN.main, ["sample", "--ckpt", runs["pcnn"] / "best.pt", "--n", "two"])
    # (the program name is the script's when run as one; here it is pytest's)
    assert code == 2 and err.startswith("error: argument --n: invalid int value: 'two' (see ") and err.count("\n") == 1


@pytest.mark.parametrize("script, argv, message", [
    (pixelCNN, ["sample", "--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
    (stable_diffusion, ["sample", "--eta", "nan"], "--eta nan: must be a finite number >= 0"),
    (stable_diffusion, ["train", "--model-channels", "0"], "--model-channels 0: must be >= 1"),
    (pixelCNN, ["train", "--kernel-size", "4"], "--kernel-size 4: must be odd"),
])
def test_sampling_and_model_flags_that_cannot_work(runs, tmp_path, script, argv, message):
    ckpt = runs["pcnn" if script is pixelCNN else "ldm"] / "best.pt"
    where = ["--ckpt", ckpt, "--out", tmp_path / "s.png"] if argv[0] == "sample" else [
        "--ae", runs["vq"] / "best.pt", "--preset", "smoke", "--out", tmp_path / "run"]
    code, _, err = run(script.main, [*argv, *where])
    assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_nonfinite_and_extreme_voxels_are_background_not_nan_pixels(nifti_folder, tmp_path):
    """Found by the long run: +-inf voxels became +-3.4e38, whose differences overflowed to NaN pixels."""
    import warnings

    import dataset

    volume = np.asarray(nib.load(str(nifti_folder / "s05.nii.gz")).get_fdata(), np.float32)
    volume[10, 12, 2:6] = [np.nan, np.inf, -np.inf, 3e38]
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.2, 1.0])), tmp_path / "v.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no invalid-value warnings on the way
        slices, notes, _, _ = dataset._volume_slices(tmp_path / "v.nii.gz", 8, 32)
    assert "3 NaN or infinite voxels read as background (0)" in notes
    assert slices.dtype == np.uint8 and slices.shape == (8, 32, 32) and slices.max() > 0


# ----------------------------------------------------------------------------------------------
# Found by a new user's sweep of bad inputs (2026-12-07): tracebacks, and runs a refused command changed


def _one_error(code, err, message):
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.fixture(scope="module")
def small_codebook_vq(tmp_path_factory, tiny_data):
    """A smoke VQ-VAE of 16 codes of dimension 2: it cannot decode what the smoke priors draw."""
    out = tmp_path_factory.mktemp("vq16") / "vq16"
    code, _, err = run(prestage_train.main, ["--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out",
                                             out, "--n-embed", 16, "--embed-dim", 2, "--steps", 2, "--val-every", 2])
    assert code == 0, err
    return out


@pytest.mark.parametrize("script, message", [
    (pixelCNN, "has 16 codes on a 16x16 grid, but this PixelCNN draws codes of 32 on a 16x16 grid"),
    (stable_diffusion, "its latents are 2x16x16, but this model draws latents of 4x16x16"),
])
def test_a_stage_one_that_cannot_decode_the_prior_is_refused(runs, small_codebook_vq, tmp_path, script, message):
    name = "pcnn" if script is pixelCNN else "ldm"
    code, _, err = run(script.main, ["sample", "--ckpt", runs[name] / "best.pt", "--ae", small_codebook_vq / "best.pt",
                                     "--z", 3, "--no-tissue-maps", "--out", tmp_path / "s.png"])
    _one_error(code, err, message)
    assert "give the stage one this" in err and not (tmp_path / "s.png").exists()


def test_a_refused_command_leaves_the_run_it_names_as_it_was(vqvae_run, tiny_data, tmp_path):
    copy = tmp_path / "vq"
    shutil.copytree(vqvae_run, copy)
    before = snapshot(copy)
    # --overwrite: the old run's files go only once every setting has been checked
    code, _, err = run(prestage_train.main, ["--model", "vqvae", "--preset", "smoke", "--data", tiny_data, "--out",
                                             copy, "--overwrite", "--batch-size", 100000])
    _one_error(code, err, "--batch-size 100000: larger than the training split")
    # a prior's run in its stage one's folder would replace the stage one's checkpoints
    code, _, err = run(pixelCNN.main, ["train", "--ae", copy / "best.pt", "--preset", "smoke", "--out", copy,
                                       "--overwrite"])
    _one_error(code, err, "is the folder of the stage one that --ae names")
    # metrics over the run's config.json, which --resume reads
    code, _, err = run(prestage_train.main, ["--eval-only", "--ckpt", copy / "best.pt", "--out-json",
                                             copy / "config.json"])
    _one_error(code, err, "config.json: is the config of the run in")
    assert snapshot(copy) == before


@pytest.mark.parametrize("script, argv, message", [
    (prestage_train, ["--model", "vae", "--crop-size", 8, "--crop-steps", 6, "--disc-weight", 0],
     "--crop-size 8: smaller than the 11x11 the perceptual loss --perceptual msssim needs; give --crop-size 12"),
    (stable_diffusion, ["train", "--timesteps", 4],
     "--sample-steps 5: the validation grid's DDIM steps must not exceed the model's --timesteps 4"),
    (prestage_train, ["--model", "vqvae", "--seed", 10**15], "--seed 1000000000000000: must lie in 0..4294967295"),
    (pixelCNN, ["train", "--seed", 10**15], "--seed 1000000000000000: must lie in 0..4294967295"),
])
def test_settings_that_failed_only_once_the_run_had_started(runs, tmp_path, script, argv, message):
    where = ["--data", runs["data"]] if script is prestage_train else ["--ae", runs["vq"] / "best.pt"]
    code, _, err = run(script.main, [*argv, "--preset", "smoke", *where, "--out", tmp_path / "run"])
    _one_error(code, err, message)
    assert not (tmp_path / "run").exists()


def test_seeds_workers_and_lists_out_of_range_are_one_line(runs, tmp_path):
    code, _, err = run(pixelCNN.main, ["sample", "--ckpt", runs["pcnn"] / "best.pt", "--seed", 2**40])
    _one_error(code, err, "argument --seed: invalid seed 1099511627776: must lie in 0..4294967295")
    code, _, err = run(dataset.main, ["build-demo", "--out", tmp_path / "ds", "--size", 64, "--seed", -1])
    _one_error(code, err, "argument --seed: invalid seed -1: must lie in 0..4294967295")
    code, _, err = run(dataset.main, ["build-demo", "--out", tmp_path / "ds", "--size", 64, "--workers", 0])
    _one_error(code, err, "--workers 0: must be at least 1")
    code, _, err = run(pixelCNN.main, ["train", "--ae", runs["vq"] / "best.pt", "--preset", "smoke", "--dilation",
                                       "1,,2", "--out", tmp_path / "run"])
    _one_error(code, err, "expected comma-separated integers, got '1,,2'")
    code, _, err = run(pixelCNN.main, ["sample", "--ckpt", runs["pcnn"] / "best.pt", "--z", "", "--out",
                                       tmp_path / "s.png"])
    _one_error(code, err, "--z '': expected a range like 0..31")
    assert not any(tmp_path.iterdir())


def test_the_demo_refuses_its_bad_flags_and_an_unreadable_timings_file_in_one_line(tmp_path):
    import demo
    code, _, err = run(demo.main, ["--size", 32])
    _one_error(code, err, "argument --size: invalid choice: 32")
    for content in ("garbage{", '["a list"]'):
        (tmp_path / "timings.json").write_text(content)
        code, _, err = run(demo.main, ["--out", tmp_path, "--data", tmp_path / "data"])
        _one_error(code, err, "timings.json: ")
        assert (tmp_path / "timings.json").read_text() == content and not (tmp_path / "data").exists()


@pytest.mark.parametrize("module, argv", [
    ("prestage_train", []), ("stable_diffusion", ["train"]), ("stable_diffusion", ["sample"]),
    ("stable_diffusion", ["evaluate"]), ("pixelCNN", ["train"]), ("pixelCNN", ["sample"]), ("pixelCNN", ["evaluate"]),
    ("dataset", ["inspect"]), ("dataset", ["build-demo"]), ("evaluation", []), ("logger", []), ("demo", []),
])
def test_every_help_prints_and_exits_0(module, argv):
    # argparse formats each help text with %: a bare % in one (as "5% of") crashed --help with a traceback
    import importlib
    code, out, err = run(importlib.import_module(module).main, [*argv, "--help"])
    assert code == 0 and "usage:" in out and not err, err
