"""The one training-loop skeleton shared by stage one (prestage_train.py), latent diffusion
(stable_diffusion.py) and the PixelCNN prior (pixelCNN.py).

A script describes *what* one step does in a `Task` (models, optimisers, `train_step`, `validate`);
`fit` does everything around it, identically for all three:
- data order: a permutation per epoch drawn from (seed, epoch), sharded across DDP ranks, so a run
  resumed at step k sees exactly the batches an uninterrupted run would;
- resume: step, epoch, position in the epoch, every model/optimiser state and every RNG state;
- checkpoints: `last.pt` every `ckpt_every` steps and at the end, `best.pt` on the validate metric,
  both written atomically (util.save_checkpoint);
- a guard that stops on a non-finite loss, naming the step and the term, without saving it;
- SIGTERM / SIGINT: finish the current step, save `last.pt`, exit with a message (code 143 / 130);
- logging: tqdm bar with live losses, `log.jsonl` (step, epoch, every loss/weight, lr, items/s);
- the step boilerplate: the learning rate of every optimiser set before each `train_step`, and the trained
  models wrapped once (`Trainer.wrap`: DistributedDataParallel under torchrun, torch.compile with --compile),
  so a `train_step` holds only the mathematics of its step;
- torchrun: rank 0 logs, validates and saves; each rank draws its own noise from a stream derived from
  (seed, rank), and every rank's RNG state is saved in last.pt, so a resumed DDP run continues exactly.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import util
from util import UserError

# ----------------------------------------------------------------------------------------------
# Config: presets + per-flag overrides, saved to config.json and into every checkpoint

RESUME_OVERRIDABLE = {"steps", "stop_at", "log_every", "val_every", "ckpt_every", "sample_every", "device", "num_workers", "compile"}


FULL = object()  # Hyper.before: "the full value", distinct from any real value


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter, declared once: its value in the `full` recipe, its help, its flag group, and the
    model kind it applies to (None: all). `arg` names the model constructor's keyword when it differs."""

    name: str
    full: object
    help: str
    group: str
    applies: str = None
    choices: tuple = None
    arg: str = None
    low: float = 0      # numbers: the smallest value that works
    high: float = None  # numbers: the largest, where there is one
    before: object = FULL  # what runs from before this hyperparameter existed had (FULL: its full value)

    @property
    def legacy(self):
        """The value a saved config that lacks this hyperparameter stands for."""
        return self.full if self.before is FULL else self.before

    def problem(self, value):
        """Why `value` cannot be this hyperparameter's value (its type follows the `full` value), or None."""
        full, whole = self.full, isinstance(self.full, int) and not isinstance(self.full, bool)
        if isinstance(full, bool):
            return None if isinstance(value, bool) else "must be true or false"
        if isinstance(full, list):
            ok = isinstance(value, list) and all(type(v) is int and v >= 1 for v in value)
            return None if ok else "must be a list of whole numbers >= 1"
        if isinstance(full, str):
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                return f"must be one of {', '.join(map(str, self.choices))}" if self.choices else "must be text"
            return None
        if not (type(value) is int if whole else type(value) in (int, float) and math.isfinite(value)):
            return "must be a whole number" if whole else "must be a finite number"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if value < self.low or (self.high is not None and value > self.high):
            return f"must lie in {self.low}..{self.high}" if self.high is not None else f"must be >= {self.low}"
        return None


GROUPS = ("data", "model", "loss", "optimisation", "loop", "output")


def loop_hypers(steps, batch_size, lr, warmup, lr_schedule, log_every, val_every, ckpt_every, seed=0):
    """The hyperparameters every trainer has, with that trainer's `full` values."""
    return [
        Hyper("batch_size", batch_size, "batch size per process", "optimisation", low=1),
        Hyper("lr", lr, "peak learning rate", "optimisation"),
        Hyper("warmup", warmup, "linear learning-rate warm-up steps", "optimisation"),
        Hyper("lr_schedule", lr_schedule, "after warm-up: constant, or cosine decay to 10%% of --lr at the last "
              "step", "optimisation", choices=("constant", "cosine")),
        Hyper("steps", steps, "total optimiser steps", "loop", low=1),
        Hyper("seed", seed, "seed of the whole run (data order, init, noise)", "loop", high=util.SEED_MAX),
        Hyper("log_every", log_every, "steps between log lines", "loop", low=1),
        Hyper("val_every", val_every, "steps between validations", "loop", low=1),
        Hyper("ckpt_every", ckpt_every, "steps between last.pt saves", "loop", low=1),
    ]


def preset_values(hypers, presets, name):
    """The config of preset `name`: every `full` value, overridden by that preset's differences."""
    names = {h.name for h in hypers}
    for preset, diff in presets.items():
        unknown = sorted(set(diff) - names)
        if unknown:  # a typo in a preset would otherwise silently add a setting nothing reads
            raise ValueError(f"preset {preset!r} sets undeclared hyperparameters {unknown}")
    config = {h.name: h.full for h in hypers}
    config.update(presets[name])
    return config


def model_kwargs(hypers, config, kind=None):
    """The model constructor's keywords: every `model`-group hyperparameter that applies to `kind` (a key
    that a run from before the hyperparameter existed lacks takes the value it then had, `Hyper.legacy`)."""
    return {h.arg or h.name: config.get(h.name, h.legacy) for h in hypers
            if h.group == "model" and h.applies in (None, kind)}


def _flag_type(value):
    """argparse keywords for a hyperparameter, from the type of its `full` value."""
    if isinstance(value, bool):
        return {"action": argparse.BooleanOptionalAction}
    if isinstance(value, list):
        return {"type": int_list, "metavar": "N,N,..."}
    return {"type": type(value)}


def _preset_note(hyper, presets):
    """'[full 1e-4; demo 1e-3; smoke 1e-3]', or '[all presets: 0]' where no preset changes it."""
    values = {"full": hyper.full, **{p: d[hyper.name] for p, d in presets.items() if hyper.name in d}}
    if len(values) == 1:
        return f"[all presets: {hyper.full}]"
    return "[" + "; ".join(f"{p} {v}" for p, v in values.items()) + "]"


def add_hyper_args(parser, hypers, presets):
    """One flag per hyperparameter (default None: the preset decides), in EDM-style groups."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS if any(h.group == name for h in hypers)}
    for hyper in sorted(hypers, key=lambda h: GROUPS.index(h.group)):
        where = f" ({hyper.applies} only)" if hyper.applies else ""
        groups[hyper.group].add_argument(f"--{hyper.name.replace('_', '-')}", default=None, choices=hyper.choices,
                                         help=f"{hyper.help}{where} {_preset_note(hyper, presets)}",
                                         **_flag_type(hyper.full))
    return groups


def add_common_args(parser, hypers, presets):
    """Flags every trainer has: its hyperparameters, preset, run dir, resume, device, compile, dry run.
    Returns the argument groups by name, for a script's own flags."""
    groups = add_hyper_args(parser, hypers, presets)
    run = groups["run"] = parser.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(presets), default=None,
                     help="named set of values: full = 256x256 GPU recipe, demo = minutes on a laptop CPU, "
                          "smoke = seconds (tests); default full with CUDA, demo without")
    run.add_argument("--out", default=None, help="run directory (default runs/<stage>-<preset>)")
    run.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR from last.pt")
    run.add_argument("--overwrite", action="store_true", help="start over in an existing run directory")
    run.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default auto)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="torch.compile the model (CUDA; measured in playground/benchmark.py)")
    run.add_argument("--stop-at", type=int, default=None,
                     help="save last.pt and exit at this step without changing the schedule (run in chunks "
                          "on time-limited clusters; continue with --resume)")
    run.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    return groups


def int_list(text):
    """argparse type for '1,2,4' -> [1, 2, 4] ('' -> [], e.g. no attention; an empty item, as in '1,,2', is a
    typo and refused)."""
    if not text.strip():
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def resolve_config(args, hypers, presets, stage, exclude=()):
    """Preset values, overridden by every flag given explicitly; the preset is printed and recorded.

    `exclude` names flags that steer the command rather than the run (e.g. --eval-only, --split).
    """
    skip = {"resume", "overwrite", "dry_run", "out", "preset", *exclude}
    given = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    check_values(given, hypers)
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise UserError(f"--out {args.out}: does not apply with --resume (the run continues in {args.resume}); "
                        f"to start a new run there, leave out --resume")
    if args.resume:
        return check_config(_resume_config(args, given, hypers, stage))
    preset = args.preset or ("full" if torch.cuda.is_available() else "demo")
    config = preset_values(hypers, presets, preset)
    config.update(given)
    config["preset"] = preset
    config["stage"] = stage
    config["out"] = args.out or f"runs/{stage}-{preset}"
    return check_config(config)


def typed_flag(name, value):
    """A flag as the user typed it: `--no-vq-ema` for a switch given False, else `--vq-ema`."""
    return ("--no-" if value is False else "--") + name.replace("_", "-")


def check_applies(args, hypers, kind, kind_flag, resumed=False):
    """Refuse a flag given for a model kind it does not apply to (e.g. --n-embed with a VAE): ignored, it would
    let the user believe the run used it."""
    for hyper in hypers:
        given = getattr(args, hyper.name, None)
        if hyper.applies not in (None, kind) and given is not None:
            source = " (its config.json)" if resumed else ""
            raise UserError(f"{typed_flag(hyper.name, given)}: applies only with {kind_flag} {hyper.applies}, and "
                            f"this run is {kind_flag} {kind}{source}")


def check_values(values, hypers, where=None):
    """One line for the first hyperparameter value that cannot work: named as its flag (`where` None), or as
    the key of the file `where` describes."""
    for hyper in hypers:
        if hyper.name in values and (problem := hyper.problem(values[hyper.name])):
            name, value = hyper.name, values[hyper.name]
            if where is None:  # as typed: a list flag reads "1,2,4"
                shown = ",".join(map(str, value)) if isinstance(value, list) else value
                raise UserError(f"--{name.replace('_', '-')} {shown}: {problem}")
            raise UserError(f"{where} has {name} = {json.dumps(value, default=str)[:60]}, which {problem}")


def checked_file_config(state, hypers, where, derived=()):
    """The run config a checkpoint holds, checked where it is read: a dict whose hyperparameters have their
    types (one missing from a run older than the hyperparameter takes `Hyper.legacy`) and whose `derived`
    entries, (key, test, what it must be), pass; else one line naming the file and the key."""
    config = state.get("config")
    if not isinstance(config, dict):
        raise UserError(f"{where} holds no run config")
    check_values(config, hypers, f"{where}: its config")
    config = {**{h.name: h.legacy for h in hypers}, **config}
    for key, test, what in derived:
        if not test(config.get(key)):
            raise UserError(f"{where}: its config has {key} = {json.dumps(config.get(key), default=str)[:60]}, "
                            f"which must be {what}")
    return config


def is_whole(value, low=1):
    """A whole number >= low (bool is not a number here)."""
    return type(value) is int and value >= low


def is_shape(value, length):
    """A list of `length` whole numbers >= 1."""
    return isinstance(value, list) and len(value) == length and all(is_whole(v) for v in value)


def is_finite(value, low=0.0):
    """A finite number >= low."""
    return type(value) in (int, float) and math.isfinite(value) and value >= low


def check_config(config):
    """Refuse settings that would only fail (or divide by zero) after start-up."""
    if config.get("stop_at") is not None and config["stop_at"] < 1:
        raise UserError(f"--stop-at {config['stop_at']}: must be a step >= 1")
    if not config["lr"] > 0:
        raise UserError(f"--lr {config['lr']}: must be a positive finite number")
    return config


def _resume_config(args, given, hypers, stage=None):
    """On --resume the run's own config wins; a flag that would change the model or data is refused. The file is
    checked where it is read: every hyperparameter present and of its type (a key that a run from before the
    hyperparameter existed lacks takes the value it then had, `Hyper.legacy`), preset and stage named."""
    if Path(args.resume).is_file():
        raise UserError(f"--resume {args.resume}: is a file; give the run's folder ({Path(args.resume).parent})")
    path = Path(args.resume) / "config.json"
    if not path.is_file():
        raise UserError(f"--resume {args.resume}: no config.json there (not a run directory, or a run stopped "
                        f"before it started: start it again with --out {args.resume})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--resume {args.resume}: config.json is unreadable ({err})") from None
    where = f"--resume {args.resume}: config.json"
    if not isinstance(config, dict):
        raise UserError(f"{where} is not a run config (a JSON object)")
    for key in ("preset", "stage"):
        if not isinstance(config.get(key), str):
            raise UserError(f"{where} has no {key} name (it is not a run config of this repo, or was edited)")
    check_values(config, hypers, where)
    if not config.get("lr", 1) > 0:
        raise UserError(f"{where} has lr = {config['lr']}, which must be a positive number")
    config = {**{h.name: h.legacy for h in hypers}, **config}
    if stage is not None and config.get("stage", stage) != stage:
        raise UserError(f"--resume {args.resume}: a '{config.get('stage')}' run, not a '{stage}' run "
                        f"(resume it with its own script)")
    differ = [f"--{k.replace('_', '-')} {v} (run has {config.get(k)})" for k, v in given.items()
              if k not in RESUME_OVERRIDABLE and k in config and config[k] != v]
    if differ:
        raise UserError(f"--resume {args.resume}: these flags differ from the run's config.json and cannot change "
                        f"on resume: {', '.join(differ)}")
    config.update({k: v for k, v in given.items() if k in RESUME_OVERRIDABLE})
    config["stop_at"] = given.get("stop_at")  # a pause point belongs to one invocation, not to the run
    config["out"] = str(args.resume)
    return config


def print_config(config, title="config"):
    """Print the resolved config, one key per line (EDM-style dry run)."""
    print(f"{title}:")
    for key in sorted(config):
        print(f"  {key:24s} {config[key]}")


# ----------------------------------------------------------------------------------------------
# Distributed


def setup_distributed(device_name="auto"):
    """Initialise torch.distributed under torchrun (gloo on CPU, NCCL on CUDA); returns (rank, world, device)."""
    util.check_device_name(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, util.pick_device(device_name)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if rank == 0:
        print(f"distributed: {world} processes, backend {dist.get_backend()}, device {device}")
    return rank, world, device


def unwrap(model):
    """The plain module under DDP and torch.compile wrappers (what checkpoints store)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ----------------------------------------------------------------------------------------------
# Small pieces the tasks share


class EMA:
    """Exponential moving average of a model's weights (a deep copy updated after every step)."""

    def __init__(self, model, decay=0.999):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, decay=None):
        """Average the parameters (at `decay` where given, else the EMA's own; 0 copies them); copy buffers (running
        statistics or EMA codebooks are not weights)."""
        src, decay = unwrap(model), self.decay if decay is None else decay
        for ema_p, p in zip(self.model.parameters(), src.parameters()):
            ema_p.lerp_(p.detach(), 1 - decay)
        for ema_b, b in zip(self.model.buffers(), src.buffers()):
            ema_b.copy_(b)


def lr_at(step, config):
    """Linear warm-up over config['warmup'] steps, then constant or cosine decay to 10% of the peak.

    The cosine tail ("lr_schedule": "cosine") matters most for short runs: the last steps at a small
    rate settle the weights that a constant rate keeps shaking.
    """
    base, warmup, total = config["lr"], config["warmup"], config["steps"]
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if config.get("lr_schedule", "constant") == "cosine" and total > warmup:
        progress = (step - warmup) / (total - warmup)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return base


def rank_seed(seed, rank):
    """The seed of rank `rank`'s RNG stream (rank 0 uses `seed` itself)."""
    return seed if rank == 0 else seed + 1_000_003 * rank


def set_lr(optimizer, lr):
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class NonFiniteLoss(UserError):
    """A loss term became NaN or inf; training stops without saving the broken state."""


# ----------------------------------------------------------------------------------------------
# The loop


class Task:
    """What a stage defines; `fit` calls these. Subclasses set `kind` and fill the dicts."""

    kind = "task"
    select_metric = None  # e.g. ("val/ssim", "max"); None: best.pt follows last.pt
    items_name = "images"

    def __init__(self):
        self.models = {}      # name -> nn.Module (saved unwrapped)
        self.optimizers = {}  # name -> optimizer (the Trainer sets every one's learning rate before each step)
        self.lr_scale = {}    # optimizer name -> multiple of the scheduled rate it runs at (default 1)
        self.trained = ("model",)  # the models a train_step runs forward and backward
        self.nets = {}        # name -> the trained model as train_step calls it (DDP / compiled), set by the Trainer

    def train_step(self, batch, step):
        """One optimiser step on `batch` (tensors on device), calling the models through `self.nets`;
        returns named scalar tensors to log."""
        raise NotImplementedError

    def validate(self, step, run_dir):
        """Validation metrics (floats); may write sample grids into run_dir/samples."""
        return {}

    def extra_state(self):
        """Anything besides models/optimisers a checkpoint must carry (e.g. latent scale factor)."""
        return {}

    def load_extra_state(self, state):
        """Restore what `extra_state` saved."""


class ThreadGovernor:
    """Keeps torch's CPU threads to the cores other processes leave free.

    torch's OpenMP threads meet at a barrier after every parallel region, and a thread whose core another
    process holds arrives a scheduler slice late, so its partners wait in every region: on 2 cores one busy
    foreign process made a 2-thread step 43x slower, where one thread on the free core loses nothing
    (docs/RESULTS.md). At start-up and then every 2 s this reads the cores others kept busy (/proc/stat, this
    process's CPUs only) and trains (or samples) on the cores left; `restore` puts the start-up count back. A different
    thread count sums in a different order, so runs are bit-reproducible only with a fixed count: set
    OMP_NUM_THREADS (as the tests do) and this stays off. Off on CUDA and where /proc/stat is not readable."""

    DROP, RISE = 0.4, 0.15  # a core busier than DROP is given up; one quieter than RISE is taken back

    def __init__(self, device, say=print, doing="training"):
        self.say, self.doing = say, doing
        self.last = util.cpu_times() if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ else None
        self.enabled = self.last is not None
        self.most = torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def threads_for(self, foreign, current):
        """Threads to use while other processes keep `foreign` cores busy, from `current` (the two thresholds
        keep a load near either from switching the count back and forth)."""
        fewer = self.cores - math.ceil(max(foreign - self.DROP, 0.0))
        more = self.cores - math.ceil(max(foreign - self.RISE, 0.0))
        target = fewer if fewer < current else more if more > current else current
        return max(1, min(self.most, target))

    def start(self):
        """A first reading of the load (0.25 s) and the threads it leaves, before the work starts; returns self."""
        if self.enabled:
            time.sleep(0.25)
            self.adjust(min_wall=0.2)
        return self

    def adjust(self, min_wall=2.0):
        """Re-read the load since the last reading, once `min_wall` seconds have passed, and set the threads."""
        if not self.enabled or time.perf_counter() - self.last[2] < min_wall:
            return
        now = util.cpu_times()
        foreign = util.foreign_cores(self.last, now)
        if foreign is None:
            return
        self.last = now
        threads = self.threads_for(foreign, torch.get_num_threads())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.say(f"note: other processes kept {foreign:.1f} of {self.cores} cores busy: {self.doing} on "
                     f"{threads} thread{'s' if threads > 1 else ''} now (set OMP_NUM_THREADS to fix the count)")

    def restore(self):
        """Back to the start-up thread count."""
        if self.enabled:
            torch.set_num_threads(self.most)


class Trainer:
    """Runs a Task over in-memory training tensors; see the module docstring."""

    def __init__(self, task, config, data, device, rank=0, world=1):
        self.task, self.config, self.device = task, config, device
        self.rank, self.world = rank, world
        self.data = data  # tuple of tensors with the same first dimension, kept on `device` if small
        self.run_dir = Path(config["out"])
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best = None
        self.logger = util.JsonlLogger(self.run_dir / "log.jsonl", enabled=rank == 0)
        self.stop_signal = None
        self.pending = []  # (step, names, values) of losses not yet checked on the host (CUDA)
        self.old_handlers = {}  # signal handlers to put back after fit
        self.governor = None  # the ThreadGovernor of a running fit
        self.perm, self.perm_epoch = None, None  # this epoch's data order
        n = data[0].shape[0]
        self.batch_size = config["batch_size"]
        self.steps_per_epoch = n // (self.batch_size * world)
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {self.batch_size}: larger than the training split ({n} items"
                            f"{f' over {world} processes' if world > 1 else ''})")
        for name in task.trained:
            task.nets[name] = self.wrap(task.models[name], may_compile=name == "model")
        if rank > 0:
            # Seeded after the models are built (every rank starts from the same weights), so each rank draws
            # its own noise, time steps and dropout masks; rank 0 keeps the single-process stream.
            util.seed_everything(rank_seed(config["seed"], rank))

    def wrap(self, model, may_compile=False):
        """The module a train_step calls: DDP under torchrun, then torch.compile with --compile."""
        if self.world > 1:
            # find_unused_parameters: the z null token is unused in steps where no condition is dropped.
            model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        if may_compile and self.config.get("compile"):
            model = torch.compile(model)
        return model

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self, rng_ranks=None):
        """Everything a resumed run needs, as plain tensors and values (weights_only-loadable); `rng_ranks`
        (from `gather_rng`) holds every rank's RNG state under torchrun."""
        state = {
            "kind": self.task.kind,
            "config": self.config,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "best": self.best, "rng": util.rng_state(),
        }
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        for name, model in self.task.models.items():
            state[name] = unwrap(model).state_dict()
        for name, opt in self.task.optimizers.items():
            state[name] = opt.state_dict()
        state.update(self.task.extra_state())
        return state

    def load_state_dict(self, state):
        """Restore a checkpoint written by `state_dict`."""
        try:
            for name, model in self.task.models.items():
                unwrap(model).load_state_dict(state[name])
            for name, opt in self.task.optimizers.items():
                opt.load_state_dict(state[name])
        except (KeyError, RuntimeError, ValueError) as err:
            raise UserError(f"--resume {state.get('_path', self.run_dir)}: does not fit the model of this run "
                            f"({str(err).splitlines()[0][:160]})") from None
        self.task.load_extra_state(state)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best = state.get("best")
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world:
            util.set_rng_state(ranks[self.rank])
        else:  # a single-process checkpoint, or another world size: rank 0's state, reseeded per rank
            util.set_rng_state(state["rng"])
            if self.rank > 0:
                util.seed_everything(rank_seed(self.config["seed"] + self.step, self.rank))

    def resume(self):
        """Load last.pt of the run directory and rewind the log to its step.

        A run killed before its first checkpoint has config.json but no last.pt: there is nothing to
        lose, so it starts again from step 0 with its recorded config (log.jsonl cleared).
        """
        last = self.run_dir / "last.pt"
        if not last.exists():
            if (self.run_dir / "best.pt").exists():
                raise UserError(f"--resume {self.run_dir}: has best.pt but no last.pt, so the run cannot continue "
                                f"exactly; start it over with --out {self.run_dir} --overwrite")
            self.logger.truncate_after(0)
            if self.rank == 0:
                print(f"resume {self.run_dir}: no last.pt yet (stopped before its first checkpoint); "
                      f"starting from step 0 with its config.json")
            return
        ckpt = util.load_checkpoint(last, kind=self.task.kind, flag="--resume")
        differ = config_differences(ckpt.get("config"), self.config)
        if differ:
            raise UserError(f"--resume {last}: the checkpoint was written with other settings than this run "
                            f"({', '.join(differ)}); it belongs to another run or its inputs changed")
        self.load_state_dict(ckpt)
        if self.step > self.config["steps"]:  # checked before the log is touched: a refused resume changes nothing
            raise UserError(f"--steps {self.config['steps']}: the run in {self.run_dir} is already at step "
                            f"{self.step}; give --steps {self.step} or more to continue it")
        if self.step == self.config["steps"] and self.rank == 0:
            print(f"note: {self.run_dir} already finished its {self.step} steps; give a larger --steps to train on")
        self.logger.truncate_after(self.step)
        if self.rank == 0:
            print(f"resumed {self.run_dir}/last.pt at step {self.step} (epoch {self.epoch})")

    def save(self, name="last.pt"):
        """Atomic checkpoint write on rank 0; non-finite weights are never written over a good checkpoint.

        last.pt is saved by every rank together (it gathers their RNG states); best.pt by rank 0 alone."""
        self.check_weights_finite()
        rng_ranks = self.gather_rng() if name == "last.pt" else None
        if self.rank == 0:
            util.save_checkpoint(self.state_dict(rng_ranks), self.run_dir / name)

    def gather_rng(self):
        """Every rank's RNG state, on rank 0 (a collective under torchrun: all ranks call it); None alone."""
        if self.world == 1:
            return None
        states = [None] * self.world
        dist.all_gather_object(states, util.rng_state())
        return states

    # -- data order ----------------------------------------------------------------------------
    def batch_indices(self):
        """Indices of this rank's batch at the current position, from the (seed, epoch) permutation."""
        if self.perm_epoch != self.epoch:
            gen = torch.Generator().manual_seed(self.config["seed"] * 100003 + self.epoch)
            self.perm = torch.randperm(self.data[0].shape[0], generator=gen)
            self.perm_epoch = self.epoch
        start = (self.batch_in_epoch * self.world + self.rank) * self.batch_size
        return self.perm[start:start + self.batch_size]

    def next_batch(self):
        """This rank's batch on the device; advances the position in the epoch."""
        idx = self.batch_indices()
        self.batch_in_epoch += 1
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        batch = [t.index_select(0, idx.to(t.device)) for t in self.data]  # ~6x faster than t[idx]
        if self.device.type == "cuda" and batch[0].device.type == "cpu":
            batch = [b.pin_memory().to(self.device, non_blocking=True) for b in batch]
        return batch

    # -- guards --------------------------------------------------------------------------------
    def check_weights_finite(self):
        """Stop before saving weights that hold NaN/inf (an update after the last finite loss, or a buffer
        such as an EMA codebook, can break them without any loss term being non-finite yet)."""
        for model_name, model in self.task.models.items():
            for key, t in unwrap(model).state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    kept = self.run_dir / "last.pt"
                    tail = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was written"
                    raise NonFiniteLoss(f"non-finite weights at step {self.step}: {model_name}.{key}; training "
                                        f"stopped and {tail} (try a lower --lr)")

    def check_finite(self, losses):
        """Guard the losses: one CPU process checks now; on CUDA (no host sync per step) and under torchrun
        (every rank must stop at the same step) the check waits for `flush_checks`."""
        names = [k for k in losses if k.startswith("loss/")]  # weights, rates and stats are not guarded
        values = torch.stack([losses[k].detach().float().reshape(()) for k in names])
        # Named as log.jsonl and checkpoints number it: the step being taken ends at self.step + 1.
        if self.device.type != "cuda" and self.world == 1:
            self._raise_if_bad(values, names, self.step + 1)
        else:
            self.pending.append((self.step + 1, names, values))

    def _raise_if_bad(self, values, names, step):
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            term = names[int((~finite).nonzero()[0])]
            kept = self.run_dir / "last.pt"
            tail = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint was written"
            raise NonFiniteLoss(f"non-finite loss at step {step}: {term} = {values[names.index(term)].item()}; "
                                f"training stopped and {tail} (try a lower --lr)")

    def flush_checks(self):
        """Check the losses recorded since the last flush. Under torchrun the ranks agree first (every rank
        calls this at the same steps), so all of them stop together rather than some waiting forever in the
        next collective for a rank that has raised."""
        pending, self.pending = self.pending, []
        bad = [(step, names, values) for step, names, values in pending if not bool(torch.isfinite(values).all())]
        if self.world > 1:
            flag = torch.tensor([float(bool(bad))], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and not bad:
                raise NonFiniteLoss(f"non-finite loss on another rank by step {self.step}; training stopped "
                                    f"(that rank names the term)")
        for step, names, values in bad[:1]:
            self._raise_if_bad(values, names, step)

    def install_signal_handlers(self):
        """SIGTERM/SIGINT only set a flag: the current step (and any checkpoint write) completes first."""
        def handler(signum, frame):
            # A second Ctrl-C means it. A repeated SIGTERM does not: schedulers and torchrun may both
            # forward one, and aborting then would lose the checkpoint the first one asked for.
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            if self.stop_signal is None:
                self.stop_signal = signum

        self.old_handlers = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore_signal_handlers(self):
        """Put back the handlers that were there before `fit` (matters when fit runs in-process, e.g. tests)."""
        for sig, old in self.old_handlers.items():
            signal.signal(sig, old)

    def should_stop(self):
        """Whether any rank received a stop signal (all ranks must stop at the same step)."""
        flag = self.stop_signal is not None
        if self.world > 1:
            t = torch.tensor([float(flag)], device=self.device)
            dist.all_reduce(t)
            flag = bool(t.item() > 0)
            if flag and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM
        return flag

    # -- loop ----------------------------------------------------------------------------------
    def validate(self):
        """Rank-0 validation with its own RNG stream, so validating never changes the training stream."""
        self.check_weights_finite()  # on every rank (they hold the same weights), before best.pt may be saved
        if self.rank != 0:
            return {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config["seed"] + 7919 * self.step)
            for model in self.task.models.values():
                model.eval()
            metrics = self.task.validate(self.step, self.run_dir)
            for model in self.task.models.values():
                model.train()
        if self.task.select_metric and self.task.select_metric[0] in metrics:
            key, mode = self.task.select_metric
            value = metrics[key]
            better = self.best is None or (value > self.best if mode == "max" else value < self.best)
            if better:
                self.best = value
                self.save("best.pt")
        return metrics

    def fit(self):
        """Train until config['steps'] (or --stop-at); returns the last validation metrics."""
        try:
            return self._fit()
        finally:
            self.restore_signal_handlers()
            if self.governor is not None:
                self.governor.restore()

    def _fit(self):
        cfg = self.config
        total = cfg["steps"]
        self.install_signal_handlers()
        bar = tqdm(total=total, initial=self.step, disable=self.rank != 0, dynamic_ncols=True, leave=True,
                   file=sys.stdout, mininterval=1.0)
        metrics, t_last, items = {}, time.perf_counter(), 0
        self.governor = ThreadGovernor(self.device, bar.write if self.rank == 0 else lambda text: None).start()
        governor = self.governor
        while self.step < total:
            batch = self.next_batch()
            lr = lr_at(self.step, cfg)
            for name, opt in self.task.optimizers.items():
                set_lr(opt, lr * self.task.lr_scale.get(name, 1.0))
            losses = self.task.train_step(batch, self.step)
            losses["lr"] = lr
            self.check_finite(losses)
            governor.adjust()
            self.step += 1
            items += batch[0].shape[0] * self.world
            bar.update(1)
            log_now = self.step % cfg["log_every"] == 0 or self.step == total
            if log_now:
                self.flush_checks()
                rate = items / max(time.perf_counter() - t_last, 1e-9)
                record = {k: float(v) for k, v in losses.items()}
                record[f"{self.task.items_name}_per_s"] = rate
                if governor.enabled:
                    record["threads"] = torch.get_num_threads()
                self.log(record)
                bar.set_postfix({k.removeprefix("loss/"): f"{v:.4g}" for k, v in list(record.items())[:5]}, refresh=False)
                t_last, items = time.perf_counter(), 0
            if self.step % cfg["val_every"] == 0 or self.step == total:
                self.flush_checks()
                metrics = self.validate()
                if metrics:
                    self.log(metrics)
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                                 if isinstance(v, (int, float))))
                t_last, items = time.perf_counter(), 0
            stop = self.should_stop()
            pause = bool(cfg.get("stop_at")) and self.step >= cfg["stop_at"] and self.step < total
            if self.step % cfg["ckpt_every"] == 0 or self.step == total or stop or pause:
                self.flush_checks()
                self.save()
            if stop:
                bar.close()
                return self.interrupted()
            if pause:
                bar.close()
                if self.rank == 0:
                    print(f"--stop-at {cfg['stop_at']}: saved {self.run_dir / 'last.pt'} at step {self.step}; "
                          f"continue with --resume {self.run_dir}")
                return metrics
        bar.close()
        if self.best is None and self.rank == 0:  # no validate metric: best follows last
            self.save("best.pt")
        return metrics

    def interrupted(self):
        """Report where the run stopped after a signal and exit with the conventional code."""
        name = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}.get(self.stop_signal, str(self.stop_signal))
        if self.rank == 0:
            print(f"{name} received: saved {self.run_dir / 'last.pt'} at step {self.step}; "
                  f"continue with --resume {self.run_dir}", file=sys.stderr)
        sys.exit(128 + int(self.stop_signal))

    def log(self, record):
        """One log.jsonl line with step and epoch first."""
        self.logger.log({"step": self.step, "epoch": self.epoch, **record})


def config_differences(saved, current):
    """'key saved -> now' for every setting (other than the resume-overridable ones) that differs."""
    if not isinstance(saved, dict):
        return ["no config in the checkpoint"]
    skip = RESUME_OVERRIDABLE | {"out", "stop_at"}

    def plain(v):
        return json.loads(json.dumps(v, sort_keys=True, default=str))

    def short(v):
        text = str(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return [f"{k} {short(saved[k])} -> {short(current[k])}" for k in sorted(saved.keys() & current.keys())
            if k not in skip and plain(saved[k]) != plain(current[k])]


def build_task(make, args):
    """The Task that `make()` builds. Settings that no model can be built from (a constructor's ValueError,
    e.g. an even PixelCNN kernel) end as one line naming where the settings came from."""
    try:
        return make()
    except ValueError as err:
        where = f"--resume {args.resume}: config.json" if args.resume else "the flags and preset"
        raise UserError(f"{where}: these settings do not make a model ({str(err).splitlines()[0][:160]})") from None


def start_run(task, config, data, resume, overwrite, rank, world, device):
    """Prepare the run directory (never clobbering a run), write config.json, build the Trainer, resume."""
    run_dir = Path(config["out"])
    # built first: what it refuses (a batch larger than the data) must not cost an --overwrite'd run its files
    trainer = Trainer(task, config, data, device, rank, world)
    if rank == 0:
        util.prepare_run_dir(run_dir, resume=bool(resume), overwrite=overwrite, flag="--resume" if resume else "--out")
        if not resume:
            util.save_json(config, run_dir / "config.json")
    if world > 1:
        dist.barrier()
    if resume:
        trainer.resume()
    return trainer


def claim_run_dir(args, out, rank):
    """Check the run directory before expensive setup (stage-two encoding): refuse an existing run unless
    --resume/--overwrite, else just check it is writable. Only rank 0 touches it (no races)."""
    if rank != 0:
        return
    if args.resume or args.overwrite:
        util.check_writable(out, "--resume" if args.resume else "--out")
    else:
        util.prepare_run_dir(out, flag="--out")


def train_and_report(task, config, data, args, rank, world, device):
    """Start (or resume) the run, train, print where the best checkpoint is; returns the exit code 0."""
    fit = start_run(task, config, data_to_device(data, device), args.resume, args.overwrite, rank, world, device)
    metrics = fit.fit()
    if rank == 0 and fit.step >= config["steps"]:  # (after --stop-at the trainer has said how to continue)
        best = "none" if fit.best is None else f"{fit.best:.4f}"  # None: paused before any validation
        last = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        print(f"done: {config['out']}/best.pt (best {task.select_metric[0]} {best}); last metrics {json.dumps(last)}")
    cleanup_distributed(task)
    return 0


def data_to_device(tensors, device, limit_bytes=4 << 30):
    """Keep the whole training set on the GPU when it fits (no loader at all), else on the host."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cuda" and size <= limit_bytes:
        return tuple(t.to(device) for t in tensors)
    return tuple(tensors)


def cleanup_distributed(task=None):
    """Tear down the process group at exit, all ranks together. The task's DDP wrappers go first: one destroyed
    after its process group made gloo abort the rank ("terminate called without an active exception") in
    2 of 20 two-process runs, none of 16 with this order."""
    if task is not None:
        task.nets.clear()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
