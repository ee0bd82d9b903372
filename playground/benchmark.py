"""Speed of our models next to MONAI's generative networks, on this machine, in one run.

What is timed (each configuration in its own subprocess, for a clean peak memory and thread setting):
1. stage one: a full training step (forward, L1 + KL loss, backward, Adam step, no discriminator) of our
   VAE and of MONAI's `AutoencoderKL` at the same widths, blocks and attention, 64x64x1 slices, batch 16;
2. stage two: a training step (eps-MSE loss) of our `LatentUNet` and of MONAI's `DiffusionModelUNet` at the
   same widths, blocks, attention and heads (about 18.5M parameters), 16x16x3 latents, batch 32;
3. sampling, per latent (decoding excluded): our DDIM (50 steps), DPM-Solver++(2M) (20 steps) and ancestral
   DDPM (all 1000 steps, extrapolated from the first 50: every step costs the same), MONAI's
   `DDIMScheduler` (50 steps) on its UNet, and `model_pixelCNN.sample_codes` per 16x16 code grid;
4. our data path: slices/s that the in-memory loader delivers (`dataset.load_split(...).tensors()`, a random
   batch by `index_select`, `util.to_float`) next to the slices/s that a stage-one training step consumes.

Warm-up iterations are excluded; each number is the median of `--repeats` timed repeats (and, with
`--rounds N`, of N passes over all configurations in turn, so that drift in the machine's speed is shared by
the implementations compared). Peak memory is the
growth of the subprocess's max RSS over its baseline after imports (CPU; tracemalloc does not see torch's
allocator) or `torch.cuda.max_memory_allocated` (CUDA). GFLOP/item is counted once per model with
`torch.utils.flop_counter` (attention through the math kernel, which the counter can see), so that a
speed ratio can be read against the work each model does. `our/peer` is our items/s over MONAI's.
`--channels-last` and `--compile` add rows for our models (compilation time is reported apart; the
steady-state speed excludes it).

MONAI is optional and never a dependency of the repo: install it apart, e.g.
    .venv/bin/python -m pip install --target /tmp/monai_site monai==1.6.1 einops==0.8.2 --no-deps
and pass `--monai-path /tmp/monai_site` (it is also tried as a plain import). Without it the script says so
in one line and times our models only. torchvision is kept out of every worker (MONAI only imports it
optionally).

Commands (from the repo root):
    python playground/benchmark.py                                   # full run, all cores, ~5 min on 2 cores
    python playground/benchmark.py --monai-path /tmp/monai_site --out bench.json --channels-last --compile
    python playground/benchmark.py --monai-path /tmp/monai_site --only vae,unet --rounds 3   # ratios for the README
    python playground/benchmark.py --quick --threads 1               # tiny configs in seconds (the test's mode)
    python playground/benchmark.py --preset full                     # the full recipe's costs and GPU projection
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import count_gflop  # first: it puts the repo on sys.path
import util  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "BENCH_RESULT "

# ----------------------------------------------------------------------------------------------
# Configurations. MONAI's AutoencoderKL has one num_res_blocks for encoder and decoder and no condition, so
# our VAE is timed against it with decoder_extra_block=False and unconditional (same widths, blocks,
# attention and parameter count); the row "LDM decoder + z" times it as prestage_train.py ships it (one
# decoder block more per level, as LDM, and z-conditioned), with GFLOP/item showing what that costs.

FULL = dict(
    vae=dict(size=64, batch=16, ch=64, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=3,
             conditional=True, num_z=32, kl_weight=1e-6, lr=1e-4),
    unet=dict(latent=[3, 16, 16], batch=32, model_channels=128, channel_mult=[1, 2, 2], num_res_blocks=1,
              attn_resolutions=[8, 4], heads=8, conditional=True, num_z=32, timesteps=1000, p_uncond=0.1, lr=1e-4),
    sample=dict(batch=8, ddim_steps=50, dpmpp_steps=20, ddpm_steps=50),
    pixelcnn=dict(preset="full", n_codes=1024, grid=[16, 16], batch=8),
    data=dict(size=64, batch=16, subjects=16, seconds=1.0),
    warmup=2, repeats=3,
)
QUICK = dict(
    vae=dict(size=32, batch=2, ch=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=3,
             conditional=True, num_z=32, kl_weight=1e-6, lr=1e-4),
    unet=dict(latent=[3, 8, 8], batch=2, model_channels=16, channel_mult=[1, 2], num_res_blocks=1,
              attn_resolutions=[4], heads=2, conditional=True, num_z=32, timesteps=1000, p_uncond=0.1, lr=1e-4),
    sample=dict(batch=2, ddim_steps=4, dpmpp_steps=3, ddpm_steps=5),
    pixelcnn=dict(preset="smoke", n_codes=32, grid=[4, 4], batch=2),
    data=dict(size=32, batch=4, subjects=3, seconds=0.1),
    warmup=1, repeats=1,
)


# ----------------------------------------------------------------------------------------------
# Command line and the parent process


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configurations, one repeat (seconds; for tests)")
    p.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads per worker (default: all cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration; the median is "
                                                            "reported (default 3, quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations (default 2, quick 1)")
    p.add_argument("--rounds", type=int, default=1, help="run the whole list of configurations this many times, "
                                                         "in turn, and keep each one's median round (the "
                                                         "machine's speed drifts; alternating rounds share it)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models run")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--monai-path", default=None, help="folder holding the monai package (prepended to sys.path)")
    p.add_argument("--no-monai", action="store_true", help="time our models only, even if MONAI is importable")
    p.add_argument("--channels-last", action="store_true", help="also time our models in channels_last layout")
    p.add_argument("--compile", action="store_true", help="also time our models under torch.compile")
    p.add_argument("--data", default=None, help="64x64 dataset for the loader (default: data/embedded_64 if "
                                                "built, else a small embedded cohort in a temporary folder)")
    p.add_argument("--only", default=None, help="comma-separated groups to run: vae,unet,sample,pixelcnn,data")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the N most expensive ops (torch.profiler, self time) of each training step")
    p.add_argument("--timeout", type=int, default=900, help="seconds one worker may take")
    p.add_argument("--preset", choices=["full", "demo", "smoke"], default=None,
                   help="instead: the costs of each trainer's preset (parameters, GFLOP, memory, CPU step, GPU "
                        "projection; playground/full_costs.py, given --threads, --repeats, --out, --device and "
                        "--only, whose names are then its trainers: vqvae,vae,diffusion,pixelcnn)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats {args.repeats}: must be >= 1")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be >= 1")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup {args.warmup}: must be >= 0")
    return args


GROUPS = ("vae", "unet", "sample", "pixelcnn", "data")
CONTENDED_CORES = 0.2  # foreign CPU load (cores) above which a timing is flagged as unreliable


def monai_status(args):
    """(folder to put on sys.path, '' for a plain import, None if absent; one-line note or None).

    MONAI is looked for in --monai-path first, then as a plain import; nothing is imported here (the
    workers import it), so a broken install shows up as an error row of the MONAI configurations.
    """
    if args.no_monai:
        return None, "MONAI comparison switched off (--no-monai): timing our models only"
    if args.monai_path:
        path = str(Path(args.monai_path).resolve())
        if Path(path, "monai", "__init__.py").is_file():
            return path, None
    if importlib.util.find_spec("monai") is not None:
        return "", None
    where = f"not in --monai-path {args.monai_path} and " if args.monai_path else ""
    return None, (f"MONAI not available ({where}not importable from this Python): timing our models only "
                  f"(install it apart: pip install --target DIR monai==1.6.1 einops==0.8.2 --no-deps; "
                  f"then pass --monai-path DIR)")


def plan(args, cfg, monai_ok):
    """The measured configurations, in order: a list of job dicts for the workers."""
    only = set(args.only.split(",")) if args.only else set(GROUPS)
    unknown = only - set(GROUPS)
    if unknown:
        raise SystemExit(f"error: --only: unknown group(s) {sorted(unknown)}; expected some of {','.join(GROUPS)}")
    variants = [("eager", {})]
    if args.channels_last:
        variants.append(("channels_last", {"channels_last": True}))
    if args.compile:
        variants.append(("compile", {"compile": True}))
    jobs = []
    for group in ("vae", "unet"):
        if group not in only:
            continue
        for name, extra in variants:
            jobs.append(dict(group=group, kind=f"{group}_train", impl="ours", variant=name, **extra))
        if group == "vae":
            jobs.append(dict(group=group, kind="vae_train", impl="ours", variant="LDM decoder + z", shipped=True))
        if monai_ok:
            jobs.append(dict(group=group, kind=f"{group}_train", impl="monai", variant="eager"))
    if "sample" in only:
        for sampler in ("ddim", "dpmpp", "ddpm"):
            jobs.append(dict(group="sample", kind="sample", impl="ours", variant="eager", sampler=sampler))
        if monai_ok:
            jobs.append(dict(group="sample", kind="sample", impl="monai", variant="eager", sampler="ddim"))
    if "pixelcnn" in only:
        jobs.append(dict(group="pixelcnn", kind="pixelcnn", impl="ours", variant="eager", sample_threads=1))
        if (args.threads or default_threads()) > 1:
            jobs.append(dict(group="pixelcnn", kind="pixelcnn", impl="ours", variant="eager", sample_threads=0))
    if "data" in only:
        jobs.append(dict(group="data", kind="data", impl="ours", variant="eager"))
    return jobs


def default_threads():
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_worker(job, args, env, monai_path):
    """Run one job in a fresh interpreter; its result dict (with 'error' if it failed)."""
    payload = dict(job, threads=args.threads or default_threads(), device=args.device, quick=args.quick,
                   repeats=args.repeats, warmup=args.warmup, monai_path=monai_path, data=args.data,
                   profile_top=args.profile)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(payload)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return dict(job, error=f"timed out after {args.timeout} s", wall_s=round(time.perf_counter() - start, 1))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        return dict(job, error=f"worker exit {proc.returncode}: {tail[:300]}",
                    wall_s=round(time.perf_counter() - start, 1))
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    return result


def worker_env(threads):
    """The environment of a worker: thread counts pinned, no torchvision, quiet."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
        env[var] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def main(argv=None):
    """Plan, run every configuration in its own worker, print the table and write the JSON."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.preset:
        import full_costs

        given = [(flag, value) for flag, value in (("--threads", args.threads), ("--repeats", args.repeats),
                                                    ("--out", args.out), ("--device", args.device),
                                                    ("--only", args.only)) if value is not None]
        return full_costs.main(["--preset", args.preset, *(str(v) for pair in given for v in pair)])
    cfg = QUICK if args.quick else FULL
    threads = args.threads or default_threads()
    monai_path, monai_note = monai_status(args)
    if monai_note:
        print(monai_note, flush=True)
    jobs = plan(args, cfg, monai_path is not None)
    load_before = _loadavg()
    started = time.time()
    print(f"benchmark: {len(jobs)} configurations, {threads} thread(s), device {args.device}, "
          f"{'quick' if args.quick else 'full'} mode; load average before: {_fmt_load(load_before)}", flush=True)
    env = worker_env(threads)
    rounds = run_rounds(jobs, args, env, monai_path, argv)
    results = [median_round(runs) for runs in rounds]
    add_ratios(results)
    load_after = _loadavg()
    meta = dict(command=_command(argv),
                date_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                total_s=round(time.time() - started, 1), threads=threads, device=args.device, quick=args.quick,
                load_before=load_before, load_after=load_after, cpus=os.cpu_count(), python=platform.python_version(),
                machine=platform.machine(), monai=monai_path is not None, monai_note=monai_note,
                config={k: v for k, v in cfg.items()})
    versions = [r.get("versions") for r in results if r.get("versions")]
    for v in versions:
        meta.setdefault("versions", {}).update(v)
    print()
    print(markdown_table(results))
    print()
    print(f"load average before {_fmt_load(load_before)}, after {_fmt_load(load_after)}; "
          f"{threads} thread(s); total {meta['total_s']:.0f} s")
    busy = [r for r in results if (r.get("other_cores") or 0) > CONTENDED_CORES]
    if busy:
        worst = max(r["other_cores"] for r in busy)
        print(f"warning: other processes kept up to {worst:.2f} cores busy during {len(busy)} of {len(results)} "
              f"timed configurations (marked 'contended'); rerun on an idle machine for numbers to compare")
    for res in results:
        if res.get("profile"):
            print(f"\nprofile of {_label(res)} (one step, self time):\n{res['profile']}")
    if args.out:
        print(f"wrote {write_json(args.out, dict(meta=meta, results=results))}")
    return 1 if all("error" in r for r in results) and results else 0


def run_rounds(jobs, args, env, monai_path, argv):
    """Run every job `--rounds` times, the whole list in turn each round; per job, the list of its runs."""
    rounds = [[] for _ in jobs]
    for r in range(args.rounds):
        for job, runs in zip(jobs, rounds):
            res = run_worker(job, args, env, monai_path)
            runs.append(res)
            status = f"error: {res['error']}" if "error" in res else f"{res['items_per_s']:.3g} {res['unit']}/s"
            busy = f", other processes {res['other_cores']:.2f} cores" if res.get("other_cores") else ""
            where = f"round {r + 1}/{args.rounds} " if args.rounds > 1 else ""
            print(f"  {where}{_label(res):<44s} {status}  ({res.get('wall_s', 0):.0f} s{busy})", flush=True)
            if monai_path is not None and res.get("impl") == "monai" and "error" in res and "import" in res["error"]:
                print(f"MONAI not usable: {res['error']}", flush=True)
            if args.out:  # partial results survive an interrupted run
                write_json(args.out, dict(meta=dict(partial=True, command=_command(argv)),
                                          results=[x for done in rounds for x in done]))
    return rounds


def median_round(runs):
    """The run with the median items/s of one configuration's rounds (the lower middle for an even count),
    with every round's items/s kept under 'rounds'; a configuration that failed in every round stays an error."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["items_per_s"])
    if not ok:
        return runs[-1]
    pick = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        pick["rounds"] = [r.get("items_per_s") for r in runs]
        rates = " ".join(f"{r['items_per_s']:.3g}" for r in ok)
        pick["notes"] = [f"median of {len(ok)} rounds ({rates})", *pick.get("notes", [])]
    return pick


def _command(argv):
    return " ".join([Path(sys.executable).name, "playground/benchmark.py", *(sys.argv[1:] if argv is None else argv)])


def write_json(path, data):
    """Write `data` as indented JSON (creating the folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _fmt_load(load):
    return " ".join(f"{x:.2f}" for x in load) if load else "n/a"


def _label(res):
    """'vae_train ours (channels_last)' style name of a result."""
    name = res["kind"] + (f" {res['sampler']}" if res.get("sampler") else "")
    extra = res["variant"] if res.get("variant") != "eager" else ""
    if res["kind"] == "pixelcnn":
        extra = f"sample_codes num_threads={res.get('sample_threads') or 'all'}"
    return f"{name} {res['impl']}" + (f" ({extra})" if extra else "")


def add_ratios(results):
    """our/peer = our items/s over MONAI's for the same task; the loader's rate over the training step's."""
    def find(**kw):
        for r in results:
            if "error" not in r and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    for r in results:
        if "error" in r:
            continue
        peer = None
        if r["impl"] == "ours" and r["kind"] in ("vae_train", "unet_train"):
            peer = find(kind=r["kind"], impl="monai")
        elif r["impl"] == "ours" and r["kind"] == "sample":
            peer = find(kind="sample", impl="monai", sampler=r["sampler"])
        elif r["kind"] == "data":
            peer = find(kind="vae_train", impl="ours", variant="eager")
            if peer is not None:
                r["peer_label"] = "stage-one training step (consumer)"
        if peer is not None:
            r["ratio"] = round(r["items_per_s"] / peer["items_per_s"], 3)
            r.setdefault("peer_label", _label(peer))
        if r["impl"] == "ours" and r.get("variant") != "eager":
            base = find(kind=r["kind"], impl="ours", variant="eager")
            if base is not None:
                r["speedup_vs_eager"] = round(r["items_per_s"] / base["items_per_s"], 3)


def markdown_table(results):
    """The results as one markdown table."""
    head = ["benchmark", "impl", "params (M)", "GFLOP/item", "batch", "items/s", "s/item", "our/peer",
            "peak mem (MB)", "notes"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        name = r["kind"] + (f" {r['sampler']}" if r.get("sampler") else "")
        if r["kind"] == "pixelcnn":
            name = f"pixelcnn sample_codes num_threads={r.get('sample_threads') or 'all'}"
        impl = r["impl"] + (f" ({r['variant']})" if r.get("variant") not in (None, "eager") else "")
        if "error" in r:
            rows.append(f"| {name} | {impl} | | | | | | | | error: {r['error']} |")
            continue
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
        if "ratio" in r and r["kind"] == "data":
            ratio = f"{r['ratio']:.0f}x consumer"
        notes = list(r.get("notes", []))
        if (r.get("other_cores") or 0) > CONTENDED_CORES:
            notes.insert(0, f"**contended**: other processes used {r['other_cores']:.2f} cores")
        if "speedup_vs_eager" in r:
            notes.insert(0, f"{r['speedup_vs_eager']:.2f}x our eager")
        if r.get("compile_s") is not None:
            notes.insert(0, f"compile {r['compile_s']:.1f} s")
        rows.append("| " + " | ".join([
            name, impl, _num(r.get("params_m"), 3), _num(r.get("gflop_per_item"), 3), str(r.get("batch", "")),
            f"{r['items_per_s']:.3g} {r['unit']}/s", f"{1.0 / r['items_per_s']:.3g}", ratio,
            _num(r.get("peak_mem_mb"), 0), "; ".join(notes)]) + " |")
    return "\n".join(rows)


def _num(x, digits):
    return "" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# The worker: one configuration per process


def worker_main(job):
    """Run one job and print its result as one tagged JSON line."""
    sys.modules.setdefault("torchvision", None)  # never imported here (MONAI only tries it optionally)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if job.get("monai_path"):
        sys.path.insert(0, job["monai_path"])
    import torch

    torch.set_num_threads(job["threads"])
    cfg = QUICK if job["quick"] else FULL
    job["repeats"] = job["repeats"] or cfg["repeats"]
    job["warmup"] = cfg["warmup"] if job["warmup"] is None else job["warmup"]
    device = torch.device(job["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    versions = {"torch": torch.__version__}
    if job["impl"] == "monai":
        try:
            import monai
            versions["monai"] = monai.__version__
        except Exception as err:  # noqa: BLE001 - any import failure is reported, not raised
            print(RESULT_TAG + json.dumps(dict(job, error=f"MONAI import failed: {type(err).__name__}: {err}")))
            return 0
    torch.manual_seed(0)
    fn = {"vae_train": bench_vae_train, "unet_train": bench_unet_train, "sample": bench_sample,
          "pixelcnn": bench_pixelcnn, "data": bench_data}[job["kind"]]
    meter = Memory(device)
    result = fn(job, cfg, device, meter)
    result.update(peak_mem_mb=meter.peak_mb(), mem_kind=meter.kind, versions=versions,
                  other_cores=CONTENTION.cores(), load_end=_loadavg())
    print(RESULT_TAG + json.dumps(dict(job, **result)))
    return 0


class Memory:
    """Peak memory of this process: max RSS growth over the baseline taken at creation (CPU), or CUDA peak."""

    def __init__(self, device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "max RSS growth over baseline"
        self.reset()

    def reset(self):
        """Take the baseline now (after imports and model construction, before any timed work)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.base = _maxrss_mb()

    def peak_mb(self):
        import torch

        if self.device.type == "cuda":
            return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return round(_maxrss_mb() - self.base, 1)


def _maxrss_mb():
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class Contention:
    """CPU cores that *other* processes kept busy during a timed region (Linux: /proc/stat minus our own CPU time).

    A benchmark on a shared 2-core machine is only meaningful when this is near 0: with torch's threads
    spinning at barriers, one foreign busy core can slow a 2-thread step several times over.
    """

    def __init__(self):
        self.total = 0.0  # foreign core-seconds
        self.wall = 0.0
        self._start = None

    def start(self):
        self._start = util.cpu_times()

    def stop(self):
        end = util.cpu_times()
        cores = util.foreign_cores(self._start, end)
        if cores is not None:
            wall = end[2] - self._start[2]
            self.total += cores * wall
            self.wall += wall
        self._start = None

    def cores(self):
        """Average number of cores other processes used over the timed regions (None where unknown)."""
        return round(self.total / self.wall, 2) if self.wall > 0 else None


CONTENTION = Contention()


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats, first_separately=False):
    """(median seconds of `repeats` calls after `warmup` untimed ones, all timings, first call's seconds)."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        _sync(device)
        CONTENTION.start()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        CONTENTION.stop()
    return statistics.median(times), times, first


def count_params(model):
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 3)


def profile_step(step, n):
    """Top-n ops by self time of one call of `step` (a string table), or None for n = 0."""
    if not n:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def _prepare(model, job, device):
    """Model on the device, in channels_last if asked; returns (model, callable to train/run with)."""
    import torch

    model = model.to(device)
    if job.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if job.get("compile") else model
    return model, runner


def _layout(x, job):
    import torch

    return x.contiguous(memory_format=torch.channels_last) if job.get("channels_last") else x


def _train_result(job, model, loss_of, opt, batch, unit, device):
    """Time one optimiser step on `loss_of(batch)` and collect the common fields (GFLOP/item from the
    backward of `loss_of(n)`, except under torch.compile, which the counter cannot see through)."""
    def step(n=batch):
        opt.zero_grad(set_to_none=True)
        loss_of(n).backward()
        opt.step()

    def flops(n):
        loss_of(n).backward()
        opt.zero_grad(set_to_none=True)

    gflop = None if job.get("compile") else count_gflop(flops, 1)
    median, times, first = timed(step, device, max(job["warmup"], 1 if job.get("compile") else 0), job["repeats"])
    res = dict(params_m=count_params(model), gflop_per_item=gflop, batch=batch, unit=unit,
               items_per_s=batch / median, seconds_per_step=median, times=times,
               notes=[f"median of {job['repeats']} steps after {job['warmup']} warm-up"])
    if job.get("compile"):
        # the first call compiles (forward and backward graphs) and runs one step
        res["compile_s"] = round(first - median, 2)
    res["profile"] = profile_step(step, job.get("profile_top", 0))
    return res


def bench_vae_train(job, cfg, device, meter):
    """One stage-one training step: L1 + kl_weight * KL, backward, Adam (no perceptual loss, no GAN)."""
    import torch

    c = cfg["vae"]
    b, s = c["batch"], c["size"]
    if job["impl"] == "ours":
        from model_VAE import VAE

        shipped = bool(job.get("shipped"))  # else matched to MONAI: no extra decoder block, no condition
        model = VAE(s, 1, c["ch"], c["ch_mult"], c["num_res_blocks"], c["attn_resolutions"], c["z_channels"],
                    conditional=c["conditional"] and shipped, num_z=c["num_z"], decoder_extra_block=shipped)
    else:
        from monai.networks.nets import AutoencoderKL

        channels = tuple(c["ch"] * m for m in c["ch_mult"])
        res = [s // 2 ** i for i in range(len(channels))]
        model = AutoencoderKL(spatial_dims=2, in_channels=1, out_channels=1, channels=channels,
                              num_res_blocks=c["num_res_blocks"], latent_channels=c["z_channels"],
                              attention_levels=tuple(r in c["attn_resolutions"] for r in res),
                              norm_num_groups=min(32, c["ch"]), norm_eps=1e-6,
                              with_encoder_nonlocal_attn=True, with_decoder_nonlocal_attn=True)
    model, runner = _prepare(model, job, device)
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"], betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(0)
    x_all = _layout((torch.rand(b, 1, s, s, generator=gen) * 2 - 1).to(device), job)
    z_all = torch.randint(0, c["num_z"], (b,), generator=gen).to(device)

    def loss_of(n):
        x, z = x_all[:n], z_all[:n]
        with util.autocast(device):  # as the trainers run: bf16 on CUDA, fp32 on CPU
            if job["impl"] == "ours":
                out = runner(x, z if model.conditional else None)
                recon, kl = out["recon"], out["kl"]
            else:
                recon, mu, sigma = runner(x)
                kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2 * torch.log(sigma) - 1).flatten(1).sum(1)
        return (recon.float() - x).abs().mean() + c["kl_weight"] * kl.float().mean()

    meter.reset()  # baseline after building: peak = activations + grads + Adam state
    res = _train_result(job, model, loss_of, opt, b, "slices", device)
    res["config"] = (f"{s}x{s}x1, ch {c['ch']} x {c['ch_mult']}, {c['num_res_blocks']} res block(s), "
                     f"attn {c['attn_resolutions'] or 'mid only'}, z {c['z_channels']}")
    blocks = c["num_res_blocks"] + int(job["impl"] == "ours" and model.config["decoder_extra_block"])
    res["notes"].append(f"decoder has {blocks} block(s)/level; "
                        f"{'z-conditioned' if job['impl'] == 'ours' and model.conditional else 'unconditional'}")
    return res


def _our_unet(c):
    from model_diffusion import LatentUNet

    return LatentUNet(c["latent"][0], c["model_channels"], c["channel_mult"], c["num_res_blocks"],
                      c["attn_resolutions"], resolution=c["latent"][1], num_z=c["num_z"],
                      conditional=c["conditional"], heads=c["heads"])


def _monai_unet(c):
    from monai.networks.nets import DiffusionModelUNet

    channels = tuple(c["model_channels"] * m for m in c["channel_mult"])
    res = [c["latent"][1] // 2 ** i for i in range(len(channels))]
    return DiffusionModelUNet(spatial_dims=2, in_channels=c["latent"][0], out_channels=c["latent"][0],
                              channels=channels, num_res_blocks=c["num_res_blocks"],
                              attention_levels=tuple(r in c["attn_resolutions"] for r in res),
                              num_head_channels=tuple(ch // c["heads"] for ch in channels),
                              norm_num_groups=min(32, c["model_channels"]), norm_eps=1e-6,
                              num_class_embeds=c["num_z"] if c["conditional"] else None)


def bench_unet_train(job, cfg, device, meter):
    """One stage-two training step: eps-MSE at uniform t (our diffusion_loss; MONAI's scheduler.add_noise)."""
    import torch

    c = cfg["unet"]
    b = c["batch"]
    gen = torch.Generator().manual_seed(0)
    x0_all = _layout(torch.randn(b, *c["latent"], generator=gen).to(device), job)
    z_all = torch.randint(0, c["num_z"], (b,), generator=gen).to(device)
    if job["impl"] == "ours":
        from model_diffusion import NoiseSchedule, diffusion_loss

        model, runner = _prepare(_our_unet(c), job, device)
        schedule = NoiseSchedule("linear", c["timesteps"])

        def loss_of(n):
            with util.autocast(device):
                return diffusion_loss(runner, schedule, x0_all[:n], z_all[:n] if c["conditional"] else None,
                                      "eps", c["p_uncond"])[0]
    else:
        from monai.networks.schedulers import DDPMScheduler

        model, runner = _prepare(_monai_unet(c), job, device)
        scheduler = DDPMScheduler(num_train_timesteps=c["timesteps"], schedule="linear_beta")

        def loss_of(n):
            x0, z = x0_all[:n], z_all[:n]
            noise = torch.randn_like(x0)
            t = torch.randint(0, c["timesteps"], (n,), device=device)
            x_t = scheduler.add_noise(x0, noise, t)
            with util.autocast(device):
                pred = runner(x_t, timesteps=t, class_labels=z if c["conditional"] else None)
            return (pred.float() - noise).pow(2).mean()

    opt = torch.optim.Adam(model.parameters(), lr=c["lr"])

    meter.reset()
    res = _train_result(job, model, loss_of, opt, b, "latents", device)
    res["config"] = (f"{'x'.join(map(str, c['latent']))} latents, ch {c['model_channels']} x {c['channel_mult']}, "
                     f"{c['num_res_blocks']} res block(s), attn at {c['attn_resolutions']}, {c['heads']} heads")
    res["notes"].append("z-conditioned (MONAI: class embedding)" if c["conditional"] else "unconditional")
    if job["impl"] == "monai":
        res["notes"].append("MONAI default attention (einsum, use_flash_attention=False)")
    return res


class _Stop(Exception):
    """Raised from a sampler callback to stop after the steps that are timed."""


def bench_sample(job, cfg, device, meter):
    """Time per sampled latent of one sampler (a batch of `sample.batch`; decoding excluded)."""
    import torch

    c, s = cfg["unet"], cfg["sample"]
    b = s["batch"]
    z = torch.randint(0, c["num_z"], (b,), generator=torch.Generator().manual_seed(0)).to(device)
    shape = (b, *c["latent"])
    notes = []
    if job["impl"] == "ours":
        from model_diffusion import NoiseSchedule, sample

        model = _our_unet(c).to(device).eval()
        schedule = NoiseSchedule("linear", c["timesteps"])
        steps = {"ddim": s["ddim_steps"], "dpmpp": s["dpmpp_steps"], "ddpm": s["ddpm_steps"]}[job["sampler"]]
        scale, evaluations = 1.0, steps

        if job["sampler"] == "ddpm":
            # the full ancestral sampler takes all T steps; every step costs the same, so the first `steps` are timed
            steps = min(steps, c["timesteps"])
            scale, evaluations = c["timesteps"] / steps, c["timesteps"]

            def stop_after(i, total, x, x0):
                if i + 1 == steps:
                    raise _Stop

            def run():
                try:
                    sample(model, schedule, shape, z, sampler="ddpm", callback=stop_after if scale > 1 else None)
                except _Stop:
                    pass
            if scale > 1:
                notes.append(f"extrapolated x{scale:g} from the first {steps} of {c['timesteps']} steps")
        else:
            def run():
                sample(model, schedule, shape, z, sampler=job["sampler"], steps=steps)

        def warm():
            with torch.no_grad():
                model(torch.randn(shape, device=device), torch.full((b,), 10, device=device), z)

        def forward(n):
            with torch.no_grad():
                model(torch.randn(n, *shape[1:], device=device), torch.full((n,), 10, device=device), z[:n])
    else:
        from monai.networks.schedulers import DDIMScheduler

        model = _monai_unet(c).to(device).eval()
        steps = s["ddim_steps"]
        scale, evaluations = 1.0, steps
        scheduler = DDIMScheduler(num_train_timesteps=c["timesteps"], schedule="linear_beta", clip_sample=False)
        scheduler.set_timesteps(steps)

        @torch.no_grad()
        def run():
            x = torch.randn(shape, device=device)
            for t in scheduler.timesteps:
                eps = model(x, timesteps=torch.full((b,), int(t), device=device), class_labels=z)
                x, _ = scheduler.step(eps, int(t), x)

        def warm():
            with torch.no_grad():
                model(torch.randn(shape, device=device), timesteps=torch.full((b,), 10, device=device), class_labels=z)

        def forward(n):
            with torch.no_grad():
                model(torch.randn(n, *shape[1:], device=device), timesteps=torch.full((n,), 10, device=device),
                      class_labels=z[:n])
    gflop = round(count_gflop(forward, 1) * evaluations, 3)
    meter.reset()
    # Warm-up: network evaluations at the sampling shape (a whole sampler run would cost minutes).
    for _ in range(max(job["warmup"], 1)):
        warm()
    median, times, _ = timed(run, device, 0, job["repeats"])
    per_batch = median * scale
    notes.insert(0, f"{evaluations} steps")
    notes.append(f"median of {job['repeats']} runs; per latent, batch {b}, decoding excluded")
    return dict(params_m=count_params(model), gflop_per_item=gflop, batch=b, unit="latents", items_per_s=b / per_batch,
                seconds_per_batch=per_batch, times=times, steps=steps, extrapolation=scale, notes=notes,
                config=f"{'x'.join(map(str, c['latent']))} latents")


def bench_pixelcnn(job, cfg, device, meter):
    """Time per 16x16 code grid of `model_pixelCNN.sample_codes` (batch of `pixelcnn.batch` grids)."""
    import torch

    import pixelCNN
    import trainer
    from model_pixelCNN import sample_codes

    c = cfg["pixelcnn"]
    config = trainer.preset_values(pixelCNN.HYPERS, pixelCNN.PRESETS, c["preset"])
    model = pixelCNN.PRIOR.build(dict(config, n_codes=c["n_codes"], conditional=True, num_z=32)).to(device)
    b = c["batch"]
    z = torch.randint(0, 32, (b,), generator=torch.Generator().manual_seed(0)).to(device)
    threads = job.get("sample_threads") or None  # 1 = the function's default; None = leave torch's setting

    def run():
        sample_codes(model, tuple(c["grid"]), z, temperature=1.0, num_threads=threads)

    meter.reset()
    median, times, _ = timed(run, device, max(job["warmup"], 1), job["repeats"])
    grid = "x".join(map(str, c["grid"]))
    return dict(params_m=count_params(model), batch=b, unit="grids", items_per_s=b / median, seconds_per_batch=median,
                times=times, config=f"preset {c['preset']}, {c['n_codes']} codes, {grid} grid",
                notes=[f"{c['preset']} preset, {c['n_codes']} codes, {grid} grid, batch {b}; "
                       f"num_threads={threads or torch.get_num_threads()}"])


def bench_data(job, cfg, device, meter):
    """Slices/s of the in-memory loader: random index_select batches of tensors() + to_float (+ .to(device))."""
    import torch

    import dataset
    import util

    c = cfg["data"]
    notes = []
    path = job.get("data")
    tmp = None
    if path is None and (dataset.default_data_dir(c["size"]) / dataset.DEMO_STATS).exists() and not job["quick"]:
        path = dataset.default_data_dir(c["size"])
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_data_")
        t0 = time.perf_counter()
        dataset.build_demo(Path(tmp.name) / "embedded", size=c["size"], subjects=c["subjects"], progress=False)
        path = Path(tmp.name) / "embedded"
        notes.append(f"built a {c['subjects']}-subject embedded cohort in {time.perf_counter() - t0:.1f} s (not timed)")
    t0 = time.perf_counter()
    split = dataset.load_split(path, "train", size=c["size"])
    notes.insert(0, f"load_split('train') {len(split)} slices in {time.perf_counter() - t0:.2f} s (not timed)")
    meter.reset()
    images, z = split.tensors()
    b = c["batch"]
    gen = torch.Generator().manual_seed(0)

    def batches():
        """As many batches as fit in `seconds`; returns slices/s."""
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < c["seconds"]:
            idx = torch.randint(len(images), (b,), generator=gen)
            util.to_float(images.index_select(0, idx)).to(device, non_blocking=True)
            z.index_select(0, idx).to(device, non_blocking=True)
            done += b
        _sync(device)
        return done / (time.perf_counter() - start)

    batches()  # warm-up
    rates = []
    for _ in range(job["repeats"]):
        CONTENTION.start()
        rates.append(batches())
        CONTENTION.stop()
    rate = statistics.median(rates)
    if tmp is not None:
        tmp.cleanup()
    notes.append(f"batch {b}, median of {job['repeats']} x {c['seconds']:g} s")
    return dict(batch=b, unit="slices", items_per_s=rate, times=[b / r for r in rates], notes=notes,
                config=f"{c['size']}x{c['size']} uint8 -> float, {len(split)} train slices")


if __name__ == "__main__":
    util.run_cli(main)
