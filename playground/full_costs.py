"""Costs of each trainer's `full` preset (the 256x256 GPU recipe): counted and measured on this machine, and
projected to one H100 / H200.

Each trainer (stage one VQ-VAE and VAE with the PatchGAN on, latent diffusion, PixelCNN) is built from its
script's own hyperparameter table and Task, and its real `train_step` runs on random data of the real shapes
(the latent shape and code grid come from the full stage-one model). Per trainer:
- parameters of every network a step trains;
- GFLOP per image of one training step (forward and backward of every network, counted by
  torch.utils.flop_counter with attention on its math path; the optimiser's own arithmetic is not counted);
- activation memory per image: the bytes autograd keeps for backward during one step (saved_tensors_hooks,
  each storage once), at batch 2 minus batch 1 so that saved weights cancel; fp32 as on CPU (bf16 autocast
  stores most at half size), the generator's and discriminator's graphs summed. An estimate: gradients are
  counted apart (below), temporaries and workspaces not at all;
- measured CPU step time at batch 1 (median of --repeats after the counting steps warmed it up);
- a PROJECTION, not a measurement: GPU step time = counted FLOPs x batch / (dense bf16 peak x --mfu), and the
  preset's whole run at that rate; the peak is 989 TFLOP/s for both the H100 SXM and the H200 (same compute);
- memory at the preset's batch, an estimate: fp32 weights, gradients and two Adam moments (16 bytes per
  parameter, +4 per parameter of an EMA copy) plus batch x activations; whether it fits 24, 40 and 80 GB with
  10% kept for the CUDA context, temporaries and fragmentation, and the largest batch that fits each.

Commands (from the repo root):
    python playground/benchmark.py --preset full                     # the same as the next line
    python playground/full_costs.py                                  # all four trainers, ~3 min on 2 cores
    python playground/full_costs.py --only diffusion,pixelcnn --mfu 0.3 --out full_costs.json
"""
import argparse
import contextlib
import json
import statistics
import time
from types import SimpleNamespace
from unittest import mock

import _common  # noqa: F401  (the repo on sys.path)
import torch

import pixelCNN
import prestage_train
import stable_diffusion
import trainer as tr
import util
from _common import UserError, count_gflop

TRAINERS = ("vqvae", "vae", "diffusion", "pixelcnn")
PEAK_BF16_TFLOPS = 989.0  # H100 SXM and H200 SXM, dense bf16 tensor cores (NVIDIA's data sheets)
GPU_MEMORY_GB = (24, 40, 80)
USABLE = 0.9  # of a GPU's memory left after the CUDA context and the allocator's fragmentation
NUM_Z = 32


def stage_one_task(model, preset, device):
    """The stage-one Task of `preset` with the PatchGAN on from step 0, and a batch maker."""
    cfg = tr.preset_values(prestage_train.HYPERS, prestage_train.PRESETS, preset)
    cfg.update(model=model, conditional=True, num_z=NUM_Z, disc_start=0)
    size = cfg["size"]
    val = (torch.zeros(1, 1, size, size, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    task = prestage_train.StageOneTask(cfg, device, val)
    gen = torch.Generator().manual_seed(0)

    def batch(b):
        return (torch.randint(0, 256, (b, 1, size, size), dtype=torch.uint8, generator=gen),
                torch.randint(0, NUM_Z, (b,), generator=gen))
    return task, cfg, batch


def prior_task(script, preset, stage_one_preset, device):
    """The Task of a stage-two prior's `preset` on the latents (or codes) of the stage one of
    `stage_one_preset`, and a batch maker."""
    prior = script.PRIOR
    ae_cfg = tr.preset_values(prestage_train.HYPERS, prestage_train.PRESETS, stage_one_preset)
    ae_cfg.update(model="vqvae", conditional=True, num_z=NUM_Z)
    latent = list(prestage_train.build_autoencoder("vqvae", prestage_train.autoencoder_config(ae_cfg)).latent_shape)
    ae = SimpleNamespace(n_embed=ae_cfg["n_embed"], resolution=ae_cfg["size"])  # what complete_config reads
    gen = torch.Generator().manual_seed(0)

    def data(b):
        if prior.needs_codes:
            return torch.randint(0, ae.n_embed, (b, *latent[1:]), generator=gen)
        return torch.randn((b, *latent), generator=gen)
    def neighbours(b, pool=8):  # indices into a split's cached latents (a neighbour-conditioned prior looks them up)
        return torch.randint(0, pool, (b,), generator=gen)
    cache = {"train": data(8), "validate": data(2), "train_z": torch.zeros(8, dtype=torch.long),
             "validate_z": torch.zeros(2, dtype=torch.long)}
    cache.update({f"{split}_{side}": neighbours(n, n) for split, n in (("train", 8), ("validate", 2))
                  for side in ("below", "above")})
    cfg = tr.preset_values(prior.hypers, prior.presets, preset)
    cfg.update(conditional=True, num_z=NUM_Z, ae="(none)", ae_sha256="")
    prior.complete_config(cfg, cache, ae)
    task = prior.task(prior, cfg, device, ae, cache)
    fields = len(prior.train_data(cache))  # the batch holds what the trainer would batch for this prior
    return task, cfg, lambda b: (data(b), torch.randint(0, NUM_Z, (b,), generator=gen), neighbours(b),
                                 neighbours(b))[:fields]


def build(trainer, preset="full", device="cpu", compile=False):
    """(task, config, batch maker) of one trainer at a preset (its stage-two data from that stage one), its
    networks called as the Trainer calls them: unwrapped, or the main model under torch.compile."""
    device = torch.device(device)
    if trainer in ("vqvae", "vae"):
        task, cfg, batch = stage_one_task(trainer, preset, device)
    else:
        script = stable_diffusion if trainer == "diffusion" else pixelCNN
        task, cfg, batch = prior_task(script, preset, preset, device)
    task.nets = {name: torch.compile(task.models[name]) if compile and name == "model" else task.models[name]
                 for name in task.trained}
    return task, cfg, batch


def saved_bytes(step):
    """Bytes of the distinct storages autograd saves for backward while `step()` runs, over all its graphs (the
    tensors are held until the end, so a freed storage's address cannot be reused and counted once for two)."""
    held = {}

    def pack(t):
        held[t.untyped_storage().data_ptr()] = t
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(t.untyped_storage().nbytes() for t in held.values())


def sig(x, digits=4):
    """x to `digits` significant digits (the smoke and full presets differ by 10^5)."""
    return float(f"{x:.{digits}g}")


def memory_plan(params, ema_params, act_bytes, batch):
    """GB at `batch` (fp32 weights, grads, Adam moments, EMA copy + activations) and, per GPU size, whether it
    fits and the largest batch that does (0: not even one image)."""
    static = 16 * params + 4 * ema_params
    need = static + batch * act_bytes
    fits = {}
    for gb in GPU_MEMORY_GB:
        room = USABLE * gb * 1e9 - static
        fits[f"{gb}GB"] = {"fits": need <= USABLE * gb * 1e9, "max_batch": max(int(room // act_bytes), 0)}
    return need / 1e9, fits


def project(gflop_per_image, batch, steps, mfu):
    """(projected GPU seconds per step, hours for `steps`) at `mfu` of the dense bf16 peak."""
    seconds = gflop_per_image * 1e9 * batch / (PEAK_BF16_TFLOPS * 1e12 * mfu)
    return seconds, seconds * steps / 3600


def precision(amp):
    """The context a step runs in: as the Tasks have it (bf16 autocast on CUDA), or fp32 throughout."""
    return contextlib.nullcontext() if amp else mock.patch.object(util, "autocast", lambda *a, **k: contextlib.nullcontext())


def timed_steps(run, device, repeats):
    """Median seconds of `repeats` calls of `run()` (synchronised on CUDA)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(trainer, preset="full", repeats=2, mfu=0.35, device="cpu", amp=True, compile=False, batch=None,
            count=True):
    """Every figure of one trainer (see the module docstring) as a dict; the step is timed at `batch` (default:
    1 on CPU, the preset's batch on CUDA), after the counting steps (or, with count False, one step) warmed
    it up. On CUDA, also the peak memory of the timed steps."""
    task, cfg, make = build(trainer, preset, device, compile)
    device = torch.device(device)
    batch = batch or (cfg["batch_size"] if device.type == "cuda" else 1)
    one, two, timed_batch = make(1), make(2), make(batch)
    step = [0]

    def run(b):
        task.train_step(b, step[0])
        step[0] += 1
    row = dict(trainer=trainer, preset=preset, device=device.type, amp=amp and device.type == "cuda",
               compile=compile, batch=cfg["batch_size"], steps=cfg["steps"], timed_batch=batch)
    with precision(amp):
        t0 = time.perf_counter()
        if count:
            flops = count_gflop(lambda b: run(one), 1, digits=None)
            act = saved_bytes(lambda: run(two)) - saved_bytes(lambda: run(one))
        else:
            run(timed_batch)
        row["first_steps_s"] = round(time.perf_counter() - t0, 1)  # includes compilation under compile
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed_steps(lambda: run(timed_batch), device, repeats)
    row.update(step_s=round(seconds, 4), images_per_s=round(batch / seconds, 2))
    if device.type == "cuda":
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    if not count:
        return row
    params = sum(p.numel() for name in task.trained for p in task.models[name].parameters())
    ema = sum(p.numel() for p in task.models["ema"].parameters()) if "ema" in task.models else 0
    need_gb, fits = memory_plan(params, ema, act, cfg["batch_size"])
    gpu_s, gpu_h = project(flops, cfg["batch_size"], cfg["steps"], mfu)
    row.update(params_m=round(params / 1e6, 2), gflop_per_image=sig(flops), act_mb_per_image=sig(act / 2**20),
               memory_gb_at_batch=round(need_gb, 1), fits=fits, mfu=mfu, projected_gpu_step_s=round(gpu_s, 4),
               projected_gpu_hours=round(gpu_h, 1))
    return row


def table(rows):
    """The Markdown table of `measure` rows."""
    head = ("| trainer | params (M) | GFLOP/image/step | activations MB/image | measured s/step (batch) | batch | "
            "memory at batch (GB) | fits 24 / 40 / 80 GB (max batch) | projected GPU s/step | projected run (h) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fits = " / ".join(f"{'yes' if f['fits'] else 'no'} ({f['max_batch']})" for f in r["fits"].values())
        lines.append(f"| {r['trainer']} | {r['params_m']} | {r['gflop_per_image']} | {r['act_mb_per_image']} | "
                     f"{r['step_s']} ({r['timed_batch']}) | {r['batch']} | {r['memory_gb_at_batch']} | {fits} | "
                     f"{r['projected_gpu_step_s']} | {r['projected_gpu_hours']} ({r['steps']} steps) |")
    return "\n".join(lines)


def parse_args(argv):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(TRAINERS), help=f"comma-separated trainers: {','.join(TRAINERS)}")
    p.add_argument("--preset", default="full", help="the preset whose costs are measured (full, demo, smoke)")
    p.add_argument("--repeats", type=int, default=2, help="timed CPU steps per trainer (median reported)")
    p.add_argument("--mfu", type=float, default=0.35, help="assumed fraction of the bf16 peak a GPU step reaches")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the steps run (CUDA: bf16, "
                                                                           "timed at the preset's batch)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    only = [t for t in args.only.split(",") if t]
    bad = [t for t in only if t not in TRAINERS]
    if bad or not only:
        raise UserError(f"--only {args.only}: expected a comma-separated list of {', '.join(TRAINERS)}")
    if args.preset not in prestage_train.PRESETS:
        raise UserError(f"--preset {args.preset}: expected one of {', '.join(prestage_train.PRESETS)}")
    if args.repeats < 1:
        raise UserError(f"--repeats {args.repeats}: must be >= 1")
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu}: must lie in (0, 1]")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU on this machine")
    args.only = only
    return args


def main(argv=None):
    """Measure the chosen trainers, print the table, write the JSON."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"costs of the {args.preset!r} presets on {args.device} ({torch.get_num_threads()} threads); GPU figures are "
          f"projections at {args.mfu:.0%} of a {PEAK_BF16_TFLOPS:.0f} TFLOP/s bf16 peak (H100/H200 SXM)", flush=True)
    rows = []
    for trainer in args.only:
        rows.append(measure(trainer, args.preset, args.repeats, args.mfu, args.device))
        print(f"{trainer}: {json.dumps(rows[-1])}", flush=True)
    print()
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    util.run_cli(main)
