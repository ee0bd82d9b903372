"""Plain helpers shared by every file: errors, seeding, devices, batching, images, run directories, logs,
checkpoints, and the image metrics (SSIM, MS-SSIM, PSNR). Imports no module of this project.

The one training-loop skeleton used by all three trainers lives in `trainer.py`.
"""
import argparse
import hashlib
import json
import warnings
import math
import os
import pickletools
import random
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Errors that reach the user as one line


class UserError(Exception):
    """A problem with the user's input (path, flag, checkpoint, data): printed as one line, exit 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose bad flags end as one `error: ` line naming the flag (exit 2), not a usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


SEED_MAX = 2**32 - 1  # numpy's and every seeded stream's range (the trainer multiplies seeds into int64)


def seed_arg(text):
    """argparse type of a --seed: a whole number in 0..SEED_MAX."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give a whole number in 0..{SEED_MAX}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"invalid seed {value}: must lie in 0..{SEED_MAX}")
    return value


def run_cli(main, argv=None):
    """Run `main(argv)`, turning a UserError into one line on stderr and exit code 1 (no traceback)."""
    try:
        code = main(argv)
    except UserError as err:
        # one line even where a library's text quoted in the message has line breaks
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


# ----------------------------------------------------------------------------------------------
# Seeding and devices


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) so that a run is repeatable on the same machine."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG state a resumed run needs to continue exactly (python, numpy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return _encode_rng(state)


def set_rng_state(state):
    """Restore the RNG states saved by `rng_state`."""
    state = _decode_rng(state)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode_rng(state):
    # weights_only loading accepts tensors, lists, dicts and primitives, not tuples of numpy arrays:
    # store the python and numpy states as plain lists and tensors.
    py = state["python"]
    np_state = state["numpy"]
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = list(state["cuda"])
    return out


def _decode_rng(state):
    py = state["python"]
    npy = state["numpy"]
    out = {
        "python": (py[0], tuple(py[1]), py[2]),
        "numpy": (npy[0], npy[1].numpy().astype(np.uint32), npy[2], npy[3], npy[4]),
        "torch": state["torch"],
    }
    if "cuda" in state:
        out["cuda"] = state["cuda"]
    return out


def check_device_name(name):
    """--device is auto, cpu, cuda or cuda:N: the devices every script here is written and tested for."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(name)):
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda:") and torch.cuda.is_available() and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return name


def pick_device(name="auto", quiet=False):
    """CUDA when available (or asked for), else CPU; prints the choice. Enables TF32 on CUDA."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    device = torch.device(name)
    if device.type == "cuda":
        # TF32 matmuls/convs: ~2x faster on Ampere+ with no visible effect on these losses.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if not quiet:
        extra = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"
        print(f"device: {device}{extra}")
    return device


def autocast(device, enabled=True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op context on CPU, where we stay in fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


@torch.no_grad()
def map_batches(fn, tensors, device, batch_size=None, amp=True):
    """`fn(*batch)` over aligned tensors, `batch_size` rows at a time moved to `device` (under bf16 autocast on
    CUDA unless `amp` is False); the outputs are concatenated on the CPU. The one batched loop over a split:
    encode, decode, reconstruct. Default batch: 64 on CUDA, 16 on the CPU, where the demo autoencoder
    reconstructs 192 slices in 1.2 s at 8-16 against 2.0 s at 64 (activations that outgrow the caches)."""
    batch_size = batch_size or (64 if torch.device(device).type == "cuda" else 16)
    outs = []
    for i in range(0, len(tensors[0]), batch_size):
        with autocast(device, enabled=amp):
            outs.append(fn(*(t[i:i + batch_size].to(device) for t in tensors)).cpu())
    return torch.cat(outs)


def cpu_times():
    """(core-seconds the CPUs this process may run on have been busy, this process's CPU seconds, wall seconds)
    now, from /proc/stat (Linux); None elsewhere. Two readings give the cores other processes kept busy between.
    Only the CPUs of this process's affinity count (a cgroup or taskset share of a larger host)."""
    try:
        import resource

        allowed = os.sched_getaffinity(0)
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
                    # user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
                    user, nice, system, _, _, irq, softirq, steal = (int(v) for v in (fields + ["0"] * 8)[:8])
                    busy += user + nice + system + irq + softirq + steal
    except (ImportError, AttributeError, OSError, ValueError):
        return None
    me = resource.getrusage(resource.RUSAGE_SELF)
    return busy / os.sysconf("SC_CLK_TCK"), me.ru_utime + me.ru_stime, time.perf_counter()


def foreign_cores(before, after):
    """Average cores that other processes kept busy between two `cpu_times` readings (None if unknown)."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    busy, mine, wall = (a - b for a, b in zip(after, before))
    return max(busy - mine, 0.0) / wall


# ----------------------------------------------------------------------------------------------
# Images


def to_float(images_uint8):
    """uint8 tensor -> float32 in [-1, 1] (x / 127.5 - 1), on the tensor's device: the one conversion."""
    return images_uint8.to(torch.float32, copy=True).div_(127.5).sub_(1.0)


def to_uint8(images):
    """[-1, 1] float tensor [N, 1, H, W] (or [N, H, W]) -> uint8 numpy [N, H, W]."""
    images = images.detach().float().cpu()
    if images.dim() == 4:
        images = images[:, 0]
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def tile(arr, nrow=8, pad=2):
    """Tile arrays [N, H, W] (or [N, H, W, 3]) into one grid of the same dtype, `nrow` per row, `pad` apart."""
    arr = np.asarray(arr)
    n, h, w = arr.shape[:3]
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, *arr.shape[3:]), dtype=arr.dtype)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = arr[i]
    return grid


def image_grid(images, nrow=8, pad=2):
    """Tile [N, 1, H, W] images in [-1, 1] into one uint8 array, `nrow` images per row."""
    return tile(to_uint8(images), nrow, pad)


# Overlay colours of the tissue classes 0..3 (dataset.LABELS: background, CSF, grey matter, white matter)
TISSUE_COLOURS = np.array([[0, 0, 0], [40, 110, 255], [60, 200, 70], [255, 175, 40]], dtype=np.float32)


def overlay(images, labels, alpha=0.45):
    """RGB uint8 [N, H, W, 3]: images [N, 1, H, W] in [-1, 1] in grey, each tissue class of labels [N, H, W]
    (0..3) tinted by its TISSUE_COLOURS at `alpha`; background left untinted."""
    gray = to_uint8(images).astype(np.float32)[..., None].repeat(3, -1)
    labels = np.asarray(labels)
    tint = np.where((labels > 0)[..., None], alpha, 0.0)
    return (gray * (1 - tint) + TISSUE_COLOURS[labels] * tint).round().astype(np.uint8)


def save_labelled_grids(images, labels, levels, path, nrow=8):
    """Beside a sample grid at `path` (its images [N, 1, H, W], tissue classes [N, H, W]): <stem>_seg.png, the
    label maps as grey levels `levels[class]` (the OASIS seg PNG convention), and <stem>_overlay.png, the
    labels tinted over the images. Returns both paths."""
    from PIL import Image

    path = Path(path)
    seg, over = path.with_name(f"{path.stem}_seg.png"), path.with_name(f"{path.stem}_overlay.png")
    Image.fromarray(tile(np.asarray(levels, dtype=np.uint8)[np.asarray(labels)], nrow)).save(seg)
    Image.fromarray(tile(overlay(images, labels), nrow)).save(over)
    return seg, over


def save_image_grid(images, path, nrow=8):
    """Write a PNG grid of [N, 1, H, W] images in [-1, 1]; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow)).save(path)
    return path


def subject_sheet(stacks, spacing, every=4, pad=2):
    """One uint8 figure of whole subjects [S, K, H, W] (uint8, rows anterior -> posterior, z rising): a row per
    subject with every `every`-th axial slice, then the mid-sagittal and mid-coronal reslices (superior up),
    stretched to the voxel size `spacing` (x, y, z mm) so that a brain has its true shape. Slices that do not
    belong to one brain show as jagged edges in the reslices."""
    from PIL import Image

    stacks = np.asarray(stacks)
    s, k, h, w = stacks.shape
    sx, sy, sz = (float(v) for v in spacing)

    def reslice(plane, width, step):  # plane [K, L] -> superior up, L pixels wide, K * sz / step tall
        tall = max(1, round(k * sz / step))
        return np.asarray(Image.fromarray(np.ascontiguousarray(plane[::-1])).resize((width, tall), Image.NEAREST))

    rows = []
    for stack in stacks:
        tiles = [stack[z] for z in range(0, k, every)]
        tiles += [reslice(stack[:, :, w // 2], h, sy), reslice(stack[:, h // 2, :], w, sx)]
        rows.append(tiles)
    height = max(t.shape[0] for t in rows[0])
    widths = [t.shape[1] for t in rows[0]]
    sheet = np.zeros((s * (height + pad) + pad, sum(widths) + pad * (len(widths) + 1)), dtype=np.uint8)
    for r, tiles in enumerate(rows):
        x = pad
        for t in tiles:
            top = pad + r * (height + pad) + (height - t.shape[0]) // 2
            sheet[top:top + t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + pad
    return sheet


def save_subject_sheet(stacks, spacing, path, every=4):
    """Write `subject_sheet` as a PNG; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(subject_sheet(stacks, spacing, every)).save(path)
    return path


def save_gif(frames, path, duration_ms=80, final_hold_ms=1000):
    """Write an animated GIF from a list of uint8 [H, W] arrays (e.g. `image_grid` outputs)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pics = [Image.fromarray(f) for f in frames]
    durations = [duration_ms] * (len(pics) - 1) + [final_hold_ms]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=durations, loop=0)
    return path


# ----------------------------------------------------------------------------------------------
# Run directories, config and logs


def check_writable(directory, flag="--out"):
    """Fail early (before any training) if `directory` cannot be created or written to."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{flag} {directory}: is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-", delete=True) as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise UserError(f"{flag} {directory}: cannot write there ({err.strerror or err})") from None
    return directory


def check_json_path(path, flag):
    """A file name metrics JSON can be written to, checked before the work that produces them: a .json name, not
    a folder and not an existing file of another kind (a checkpoint given by mistake), in a folder that is created
    if missing and is writable."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name such as {path / 'metrics.json'}")
    if path.suffix.lower() != ".json":
        raise UserError(f"{flag} {path}: not a .json file name (metrics are written as JSON, e.g. metrics.json)")
    if path.is_file():
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            raise UserError(f"{flag} {path}: exists and is not a JSON file; it is left as it is") from None
        if path.name == "config.json" and any((path.parent / n).exists() for n in RUN_FILES):
            raise UserError(f"{flag} {path}: is the config of the run in {path.parent}, which --resume and every "
                            f"later command read; give another name, e.g. {path.parent / 'metrics.json'}")
    check_writable(path.parent, flag)
    return path


RUN_FILES = ("last.pt", "best.pt", "log.jsonl")  # what makes a folder a run


def prepare_run_dir(out, resume=False, overwrite=False, flag="--out"):
    """Create (or reuse, for resume) the run directory; never clobbers an existing run silently."""
    out = Path(out)
    existing = out.is_dir() and any(p.name in RUN_FILES for p in out.iterdir())
    if existing and not resume and not overwrite:
        raise UserError(f"{flag} {out}: a run already exists there; pass --resume {out} to continue it "
                        f"or --overwrite to start over")
    check_writable(out, flag)
    # Temporary files of a run that was killed mid-write (save_checkpoint, save_json, the log rewrite,
    # check_writable) are dead: a checkpoint-sized file each, so remove them rather than pile them up.
    for stale in [*out.glob(".*.tmp"), *out.glob(".write-test-*")]:
        stale.unlink(missing_ok=True)
    if overwrite and existing and not resume:
        for name in ("last.pt", "best.pt", "log.jsonl", "config.json"):
            (out / name).unlink(missing_ok=True)
    return out


def save_json(obj, path):
    """Write JSON atomically (temporary file then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class JsonlLogger:
    """Append one JSON object per line to `log.jsonl` (flushed each write so a crash loses nothing)."""

    def __init__(self, path, enabled=True):
        self.path = Path(path)
        self.enabled = enabled

    def log(self, record):
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def truncate_after(self, step):
        """Drop records logged after `step` (used on resume: those steps will be redone)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in read_jsonl(self.path) if type(r.get("step")) in (int, float) and r["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_jsonl(path):
    """The records (JSON objects) of a JSONL log. Skipped: a partial last line (a run still writing), blank
    lines, and lines that are not a JSON object (garbage, bytes that are not UTF-8)."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut off mid-write, or not JSON at all
            if isinstance(record, dict):
                records.append(record)
    return records


# ----------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(state, path):
    """Write a checkpoint atomically: a temporary file in the same folder, fsync, then rename.

    A kill at any moment leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # A full disk or quota surfaces as OSError, or from torch's zip writer as a RuntimeError
        # ("unexpected pos ..."): one line naming the file, not a traceback.
        if isinstance(err, (OSError, RuntimeError)):
            detail = getattr(err, "strerror", None) or str(err).splitlines()[0][:160]
            raise UserError(f"{path}: could not write the checkpoint ({detail}; is the disk full?); "
                            f"any previous {path.name} is unchanged") from None
        raise
    return path


def load_checkpoint(path, kind=None, flag="--ckpt"):
    """Load a checkpoint with `weights_only=True` (never runs pickled code) and check its kind.

    `kind` is a string or a tuple of accepted strings matched against the checkpoint's `kind` entry
    (e.g. "stage1", "diffusion", "pixelcnn"). Every failure is a one-line UserError naming the file.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).exists():
                path = path / name
                break
    if not path.is_file():
        raise UserError(f"{flag} {path}: no such checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are noise to a user here
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every loader failure becomes one clear line
        # The safe unpickler refuses pickled objects and also fails on random or cut bytes: a record whose
        # opcodes read to the end intact was refused for what it holds; any other failure is a broken file.
        if _pickle_reads_whole(path):
            raise UserError(f"{flag} {path}: refused, the file holds pickled code or objects, which are never "
                            f"loaded (only tensors and plain values are)") from None
        detail = str(err).split("WeightsUnpickler error:", 1)[-1].strip() or type(err).__name__
        raise UserError(f"{flag} {path}: not a readable checkpoint (truncated or corrupt: "
                        f"{detail.splitlines()[0][:100]})") from None
    if not isinstance(state, dict) or "kind" not in state:
        raise UserError(f"{flag} {path}: not a checkpoint of this repo (no 'kind' entry)")
    accepted = (kind,) if isinstance(kind, str) else kind
    if accepted and state["kind"] not in accepted:
        raise UserError(f"{flag} {path}: is a '{state['kind']}' checkpoint, expected {' or '.join(accepted)}")
    state["_path"] = str(path)
    return state


def _pickle_reads_whole(path):
    """Whether the pickle in a checkpoint (torch's zip archive, or a bare pickle) reads opcode by opcode to its
    STOP. Only the opcodes are read: nothing is constructed, imported or called."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        else:
            data = Path(path).read_bytes()
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:  # noqa: BLE001 - anything unreadable is a broken file
        return False


def file_sha256(path, limit=None):
    """Hex SHA-256 of a file (records which stage-one checkpoint a stage-two model was trained on)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Metrics: SSIM (Gaussian 11x11, sigma 1.5, equal to scikit-image's gaussian_weights=True,
# use_sample_covariance=False), MS-SSIM (Wang et al. 2003 weights), PSNR


def _gaussian_window(size=11, sigma=1.5, device=None, dtype=torch.float32):
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g


def _valid_blur_matrix(n, g):
    """[n, n - len(g) + 1] matrix whose column j holds g at rows j..j+len(g)-1: t @ M is the 'valid' 1-D
    correlation of t's last dimension with g."""
    out = n - len(g) + 1
    m = torch.zeros(n, out, device=g.device, dtype=g.dtype)
    j = torch.arange(out, device=g.device)
    for k in range(len(g)):
        m[j + k, j] = g[k]
    return m


def _ssim_maps(x, y, data_range, size=11, sigma=1.5):
    """Per-pixel SSIM and contrast-structure maps over the 'valid' region (no padding)."""
    if min(x.shape[-2:]) < size:
        raise ValueError(f"SSIM's {size}x{size} window needs images at least that large, got {tuple(x.shape[-2:])}")
    g = _gaussian_window(size, sigma, x.device, x.dtype)
    rows, cols = _valid_blur_matrix(x.shape[-2], g), _valid_blur_matrix(x.shape[-1], g)

    def blur(t):  # separable 'valid' Gaussian as two matrix products: 4x faster on CPU than 1-channel convs
        return rows.T @ (t @ cols)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    return ssim_map, cs


def ssim(x, y, data_range=2.0, size=11, sigma=1.5):
    """Mean SSIM per image, [N] tensor, for [N, C, H, W] inputs (images in [-1, 1] have data_range 2).

    Matches skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=...) which also averages over the region that the
    11x11 window covers without padding.
    """
    x, y = x.float(), y.float()
    ssim_map, _ = _ssim_maps(x, y, data_range, size, sigma)
    return ssim_map.mean(dim=(1, 2, 3))


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(x, y, data_range=2.0, size=11, sigma=1.5, weights=MS_SSIM_WEIGHTS):
    """Multi-scale SSIM per image (Wang, Simoncelli & Bovik 2003), [N] tensor.

    Uses as many of the five scales as the image allows for the 11x11 window (a 64x64 image gets
    three); the weights of the scales used are renormalised to sum to 1. Contrast-structure terms
    are clamped at 0 (as pytorch-msssim does) so that fractional powers stay real.
    """
    x, y = x.float(), y.float()
    levels = len(weights)
    while levels > 1 and min(x.shape[-2:]) // 2 ** (levels - 1) < size:
        levels -= 1
    w = torch.tensor(weights[:levels], device=x.device)
    w = w / w.sum()
    values = []
    for level in range(levels):
        ssim_map, cs = _ssim_maps(x, y, data_range, size, sigma)
        if level == levels - 1:
            values.append(ssim_map.mean(dim=(1, 2, 3)).clamp(min=0))
        else:
            values.append(cs.mean(dim=(1, 2, 3)).clamp(min=0))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=1)  # [N, levels]
    return torch.prod(stacked ** w[None, :], dim=1)


def psnr(x, y, data_range=2.0):
    """PSNR in dB per image, [N] tensor (skimage.metrics.peak_signal_noise_ratio on each image)."""
    mse = ((x.float() - y.float()) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse.clamp(min=1e-12))
