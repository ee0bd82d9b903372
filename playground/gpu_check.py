"""One-shot GPU check: what the full recipe does on one CUDA GPU, in about 6 minutes (341 s on an H200), as one
JSON and one Markdown table.

Parts (each runs on its own; one that fails is recorded with its error and the others still run):
1. `step_rates`: each trainer's `full` preset (stage one VQ-VAE and VAE with the PatchGAN on, latent
   diffusion, PixelCNN) at its own batch size: images/s and peak memory in fp32 and bf16, eager, and under
   torch.compile (bf16) for the two heaviest trainers, with the compile time (playground/full_costs.py);
2. `stage_one_run`: a short full-preset VQ-VAE run (`prestage_train.py --preset full`) on the embedded
   set built at 256x256, with a validate pass: its step rate and validate SSIM;
3. `benchmark`: playground/benchmark.py on the GPU: the autoencoder and UNet steps next to MONAI's (the
   ratio, where MONAI is importable or given by --monai-path) and the samplers' ms per latent.

On a machine without CUDA it refuses in one line. Commands:
    bash playground/gpu_check.sh                         # writes gpu_check/gpu_check.{json,md}
    python playground/gpu_check.py --out DIR --monai-path /tmp/monai_site --only step_rates,stage_one_run
"""
import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import _common  # noqa: F401  (the repo on sys.path)
import torch

import util
from _common import UserError

PARTS = ("step_rates", "stage_one_run", "benchmark")
COMPILED = ("vqvae", "diffusion")  # the two heaviest steps; compiling all four would take most of the budget


def step_rates(device="cuda", preset="full", trainers=("vqvae", "vae", "diffusion", "pixelcnn"), repeats=5,
               compiled=COMPILED, batch=None):
    """Rows of full_costs.measure per trainer: fp32 and bf16 eager, and bf16 compiled for `compiled`."""
    import full_costs

    rows = []
    for trainer in trainers:
        variants = [(False, False), (True, False)] + ([(True, True)] if trainer in compiled else [])
        for amp, compile in variants:
            try:  # one variant that fails (an out-of-memory, a compiler error) keeps the rows measured so far
                rows.append(full_costs.measure(trainer, preset, repeats, device=device, amp=amp, compile=compile,
                                               batch=batch, count=False))
            except (Exception, SystemExit) as err:  # noqa: BLE001 - recorded in the report, not raised
                rows.append(dict(trainer=trainer, amp=amp, compile=compile, error=f"{type(err).__name__}: {err}"))
                if device == "cuda":
                    torch.cuda.empty_cache()
            print(f"step_rates: {json.dumps(rows[-1])}", flush=True)
    return rows


def stage_one_run(device="cuda", preset="full", size=256, steps=200, subjects=3):
    """A short `prestage_train.py` run of `preset` on the embedded set at `size`; its last validation and rate."""
    import dataset
    import prestage_train

    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        dataset.build_demo(data, size=size, subjects=subjects, seed=0, progress=False)
        start = time.perf_counter()
        prestage_train.main(["--model", "vqvae", "--preset", preset, "--data", str(data), "--out", str(out),
                             "--device", device, "--size", str(size), "--steps", str(steps),
                             "--val-every", str(steps), "--ckpt-every", str(steps), "--log-every", str(max(steps // 4, 1)),
                             "--disc-start", str(steps // 2), "--val-max", "64"])
        records = util.read_jsonl(out / "log.jsonl")
    val = [r for r in records if "val/ssim" in r][-1]
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    return dict(steps=steps, size=size, seconds=round(time.perf_counter() - start, 1),
                images_per_s_last=round(rates[-1], 2), **{k: round(v, 4) for k, v in val.items() if k != "step"})


def benchmark(device="cuda", monai_path=None, quick=False):
    """playground/benchmark.py on `device` (its JSON results)."""
    import benchmark as bench

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        argv = ["--device", device, "--only", "vae,unet,sample", "--out", str(out)]
        argv += ["--monai-path", monai_path] if monai_path else []
        argv += ["--quick"] if quick else []
        bench.main(argv)
        return json.loads(out.read_text())["results"]


def run_parts(parts, kwargs, after_each=None):
    """{part: result or {"error": ...}}: each part runs on its own, a failure is recorded, not raised;
    `after_each(results)` runs after every part (main writes the report then, so a run cut short keeps it)."""
    results = {}
    for name in parts:
        start = time.perf_counter()
        try:
            results[name] = {"result": globals()[name](**kwargs.get(name, {}))}
        except (Exception, SystemExit) as err:  # noqa: BLE001 - a check reports every part it could run
            results[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=4)}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {'error' if 'error' in results[name] else 'done'} in {results[name]['seconds']} s", flush=True)
        if after_each is not None:
            try:  # a report that cannot be written now must not stop the parts still to run
                after_each(results)
            except Exception as err:  # noqa: BLE001
                print(f"warning: report not written after {name}: {type(err).__name__}: {err}", flush=True)
    return results


def markdown(results, meta):
    """The Markdown report of `run_parts` results."""
    lines = [f"# GPU check: {meta['gpu']}", "", f"torch {meta['torch']}, {meta['date_utc']}; total {meta['total_s']} s", ""]
    part = results.get("step_rates", {})
    if "result" in part:
        lines += ["## Full-preset training steps", "",
                  "| trainer | precision | compile | batch | images/s | step s | peak GB | first steps s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['trainer']} | {'bf16' if r['amp'] else 'fp32'} | {'yes' if r['compile'] else 'no'} | "
                  + (f"error: {r['error']} | | | | |" if "error" in r else
                     f"{r['timed_batch']} | {r['images_per_s']} | {r['step_s']} | {r.get('peak_memory_gb', '-')} | "
                     f"{r['first_steps_s']} |") for r in part["result"]]
        lines.append("")
    part = results.get("stage_one_run", {})
    if "result" in part:
        lines += ["## Short full-preset stage-one run", "", "| " + " | ".join(part["result"]) + " |",
                  "|" + "---|" * len(part["result"]), "| " + " | ".join(str(v) for v in part["result"].values()) + " |", ""]
    part = results.get("benchmark", {})
    if "result" in part:
        import benchmark as bench

        lines += ["## benchmark.py on the GPU", "", bench.markdown_table(part["result"]), ""]
    for name, part in results.items():
        if "error" in part:
            lines += [f"**{name} failed**: `{part['error']}`", ""]
    return "\n".join(lines)


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {','.join(PARTS)}")
    p.add_argument("--monai-path", default=None, help="folder holding the monai package, for the MONAI ratio")
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    if not args.only or any(x not in PARTS for x in args.only):
        raise UserError(f"--only {','.join(args.only)}: expected a comma-separated list of {', '.join(PARTS)}")
    return args


def main(argv=None):
    """Refuse without CUDA; otherwise run the parts and write the JSON and Markdown."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("gpu_check needs a CUDA GPU and torch sees none here; on CPU, playground/full_costs.py "
                        "gives the full presets' counted costs and GPU projections")
    out = util.check_writable(args.out, "--out")
    started = time.time()

    def write(results):
        meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
                    date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    total_s=round(time.time() - started, 1))
        (out / "gpu_check.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
        (out / "gpu_check.md").write_text(markdown(results, meta))
        return meta

    results = run_parts(args.only, {"benchmark": {"monai_path": args.monai_path}}, after_each=write)
    print(markdown(results, write(results)))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 1 if all("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    util.run_cli(main)
