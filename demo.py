"""The whole pipeline on the embedded MNI dataset, on a laptop CPU: what `make demo` runs.

Commands:
    python demo.py                 # build data, stage one (VQ-VAE), latent diffusion, PixelCNN, samples with
                                   # tissue maps, whole subjects as NIfTI, metrics (with train-on-synthetic /
                                   # test-on-real segmentation), plots
    python demo.py --model vae     # stage one as a VAE (the PixelCNN step is skipped: it needs codes)
    python demo.py --out runs/demo2 --seed 1
    python demo.py --size 128      # the same at 128x128 (data/embedded_128, runs/demo128): stage one gets one more
                                   # level, so its latents are 16x16 as at 64 and stage two costs what it costs there

Each step is the command a user would type, printed before it runs. A step whose output already
exists is skipped (delete runs/demo, or `make clean-demo`, to redo everything), so an interrupted
demo continues where it stopped and no finished run is ever overwritten. Wall time per step is
written to <out>/timings.json.
"""
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import util

ROOT = Path(__file__).resolve().parent


def step(name, argv, done_when, timings):
    """Run one pipeline command unless its output exists; record its wall time."""
    cmd = [sys.executable, *[str(a) for a in argv]]
    shown = "python " + " ".join(shlex.quote(str(a)) for a in argv)
    if done_when is not None and Path(done_when).exists():
        print(f"\n=== {name}: {done_when} exists, skipped ({shown})")
        return
    print(f"\n=== {name}\n$ {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    timings[name] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        print(f"error: demo step '{name}' failed (exit {proc.returncode}); fix the problem above and run "
              f"`make demo` again: finished steps are kept and skipped", file=sys.stderr)
        sys.exit(proc.returncode)


# --size 128: one more stage-one level (8x downsampling), so stage two sees the 16x16 latents it sees at 64
STAGE_ONE_AT = {64: [], 128: ["--size", 128, "--ch-mult", "1,2,4,4"]}


def parse_args(argv=None):
    """The demo's flags; --out and --data default by --size."""
    p = util.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=["vqvae", "vae"], default="vqvae", help="stage-one autoencoder")
    p.add_argument("--size", type=int, choices=sorted(STAGE_ONE_AT), default=64,
                   help="slice size: 64 (make demo, ~20 min) or 128 (stage one 8x down to 16x16 latents; 60 min of steps on 2 cores)")
    p.add_argument("--out", default=None, help="folder for every run, sample and figure [runs/demo; "
                   "runs/demo128 at --size 128]")
    p.add_argument("--data", default=None, help="dataset folder, built here if missing [data/embedded_<size>]")
    p.add_argument("--seed", type=util.seed_arg, default=0, help="seed of every step")
    args = p.parse_args(argv)
    args.out = Path(args.out or ("runs/demo" if args.size == 64 else f"runs/demo{args.size}"))
    args.data = Path(args.data or f"data/embedded_{args.size}")
    return args


def plan(args):
    """The pipeline as (name, argv, output that marks it done) triples, in order."""
    out, data = args.out, args.data
    stage1, ldm, prior = out / f"stage1-{args.model}", out / "ldm", out / "pixelcnn"
    seed = ["--seed", args.seed]
    steps = [
        ("build embedded dataset", ["dataset.py", "build-demo", "--out", data, "--size", args.size,
                                    "--seed", args.seed], data / "keras_png_slices_train"),
        ("stage one", ["prestage_train.py", "--model", args.model, "--preset", "demo", *STAGE_ONE_AT[args.size],
                       "--data", data, "--out", stage1, *seed], stage1 / "best.pt"),
        ("stage one: test metrics", ["prestage_train.py", "--eval-only", "--split", "test", "--ckpt",
                                     stage1 / "best.pt", "--out-json", out / "metrics_stage1_test.json"],
         out / "metrics_stage1_test.json"),
        ("latent diffusion", ["stable_diffusion.py", "train", "--ae", stage1 / "best.pt", "--preset", "demo",
                              "--out", ldm, *seed], ldm / "best.pt"),
    ]
    # DPM-Solver++ in 20 steps: 2.5x faster than DDIM 50; SWD within 2%, FD and z-MAE within 6% (docs/RESULTS.md)
    sampler = ["--sampler", "dpmpp", "--steps", 20]
    # --tstr: a segmenter trained on the samples and their tissue maps, scored on real test slices (README); the
    # demo's reduced form (200 steps, no rows on 2 real subjects) takes 2 segmenter trainings of 4, each half as long
    tstr = ["--tstr", 200, "--no-tstr-two-subjects"]
    steps += [
        ("diffusion samples", ["stable_diffusion.py", "sample", "--ckpt", ldm / "best.pt", "--n", 2, "--z", "0..31",
                               *sampler, "--out", out / "samples_ldm.png", "--gif", out / "denoising.gif", *seed],
         out / "samples_ldm.png"),
        ("whole subjects", ["stable_diffusion.py", "sample", "--ckpt", ldm / "best.pt", "--subjects", 2, *sampler,
                            "--out", out / "subjects", *seed], out / "subjects" / "subjects.png"),
        # 16 subjects: the slices of 4 whole brains cover the data too thinly for a stable SWD (docs/RESULTS.md)
        ("diffusion metrics", ["stable_diffusion.py", "evaluate", "--ckpt", ldm / "best.pt", *sampler,
                               "--n", 16, *tstr, "--out", out / "metrics_ldm.json", *seed], out / "metrics_ldm.json"),
    ]
    runs = [stage1, ldm]
    if args.model == "vqvae":
        # guidance 1.75 at temperature 1.2: on the demo's prior, over three sampling seeds, z-index error 1.58
        # against 1.91 at guidance 1.5, SWD as good, diversity and copies the same (docs/RESULTS.md)
        guide = ["--guidance", 1.75, "--temperature", 1.2]
        steps += [
            ("PixelCNN prior", ["pixelCNN.py", "train", "--ae", stage1 / "best.pt", "--preset", "demo",
                                "--out", prior, *seed], prior / "best.pt"),
            ("PixelCNN samples", ["pixelCNN.py", "sample", "--ckpt", prior / "best.pt", "--n", 2, "--z", "0..31",
                                  *guide, "--out", out / "samples_pixelcnn.png", *seed], out / "samples_pixelcnn.png"),
            ("PixelCNN metrics", ["pixelCNN.py", "evaluate", "--ckpt", prior / "best.pt", "--n", 16, *guide, *tstr,
                                  "--out", out / "metrics_pixelcnn.json", *seed], out / "metrics_pixelcnn.json"),
        ]
        runs.append(prior)
    steps.append(("training curves", ["logger.py", *runs, "--out", out / "curves.png", "--smooth", 3], None))
    return steps, stage1


def read_timings(path):
    """The step timings an earlier demo wrote to `path` ({} if none); None, after one error line, where the file
    is not such a record (it is left as it is)."""
    if not path.exists():
        return {}
    try:
        timings = json.loads(path.read_text())
        ok = isinstance(timings, dict) and all(isinstance(v, (int, float)) for v in timings.values())
        why = None if ok else "is not a JSON object of step seconds"
    except (OSError, UnicodeDecodeError, ValueError) as err:
        why = f"cannot be read ({str(err).splitlines()[0][:80]})"
    if why:
        print(f"error: {path}: {why}; move it away (the demo writes its step timings there)", file=sys.stderr)
        return None
    return timings


def main(argv=None):
    """Run the pipeline end to end."""
    args = parse_args(argv)
    out = args.out
    for flag, path in (("--out", out), ("--data", args.data)):
        if path.exists() and not path.is_dir():
            print(f"error: {flag} {path}: is a file, not a folder", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = read_timings(timings_path)
    if timings is None:
        return 2
    steps, stage1 = plan(args)
    for name, cmd, done_when in steps:
        step(name, cmd, done_when, timings)
        timings_path.write_text(json.dumps(timings, indent=2) + "\n")  # after each step: a resumed demo keeps them

    print(f"\nDemo finished in {sum(timings.values()):.0f}s of steps run now ({timings_path}).")
    print("Figures:")
    for name in ("samples_ldm.png", "samples_ldm_overlay.png", "denoising.gif", "samples_pixelcnn.png",
                 "samples_pixelcnn_overlay.png", "curves.png"):
        if (out / name).exists():
            print(f"  {out / name}")
    print(f"  {stage1 / 'samples'}/recon_*.png (validate inputs over reconstructions)")
    if (out / "subjects").is_dir():
        print(f"  {out / 'subjects'}/subjects.png (whole subjects: axial slices, mid-sagittal and mid-coronal "
              f"reslices) and subject_000.nii.gz ... (open in ITK-SNAP or FSLeyes)")
    print("Metrics:")
    for name in ("metrics_stage1_test.json", "metrics_ldm.json", "metrics_pixelcnn.json"):
        if (out / name).exists():
            print(f"  {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
