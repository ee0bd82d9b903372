"""Brain MRI slices from any source through one API, plus the embedded dataset that ships offline.

Every source comes back as a `SliceSet` per split: uint8 images [N, S, S] at the requested square
size S (32, 64, 128 or 256), each slice with its z-index (-1 where unknown) and its subject id.
Splits never share a subject. With `labels=True` a split also carries its tissue maps (`SliceSet.labels`,
uint8 classes 0..3 = background, CSF, grey, white matter, aligned with each slice and resized by nearest
neighbour) where the data has them: the OASIS layout's seg PNGs (levels 0/85/170/255, seg_<subject>_slice_<z>
.nii.png), which the embedded set writes too, and for NIfTI a label volume NAME_seg.nii.gz beside each NAME.nii.gz
(values 0..3 or those levels, on the image's grid, sliced where the image is). A map without its image, an image
without its map (where the data has maps), a size or grid mismatch or a stray value is one error naming the
file; `inspect` checks them.

Sources (`detect_layout` tells them apart):
- oasis:  a folder holding keras_png_slices_{train,validate,test} (and optionally
          keras_png_slices_seg_*), files named case_<subject>_slice_<z>.nii.png. The same tree one or
          two folders deeper (as the archive extracts) is found on its own.
- nifti:  a folder of .nii / .nii.gz / .img+.hdr volumes, one subject each. K axial slices spread
          over the brain's non-zero extent, z = slice rank 0..K-1, robust per-volume normalisation.
- folder: a plain folder of images (png, jpg, bmp, tif). Unconditional: z = -1, `conditional` False.
          Uses train/validate/test subfolders when present, else splits by file.

The embedded dataset is a pseudo-cohort made from the MNI ICBM152 2009a T1 template inside the
installed nilearn wheel: each subject gets its own smooth non-linear deformation, small affine,
bias field, contrast and noise, and is written in the OASIS PNG layout (images and seg maps).

Commands:
    python dataset.py build-demo --out data/demo_64 --size 64                  # 64 subjects, seconds
    python dataset.py build-demo --out data/demo_256 --size 256 --subjects 300 # OASIS-sized
    python dataset.py inspect data/demo_64 --size 64
    python dataset.py inspect /path/to/keras_png_slices_data --size 128
"""
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from util import ArgumentParser, UserError, run_cli, seed_arg, to_float

SPLITS = ("train", "validate", "test")
SIZES = (32, 64, 128, 256)
FRACTIONS = {"train": 0.8, "validate": 0.1, "test": 0.1}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
VOLUME_EXTS = (".nii.gz", ".nii", ".img")
JUNK_NAMES = {"thumbs.db", "desktop.ini", "__macosx"}
OASIS_DIR = "keras_png_slices_{}"
OASIS_SEG_DIR = "keras_png_slices_seg_{}"
OASIS_TREE = re.compile(r"keras_png_slices_(?:seg_)?(?:train|validate|test)")
OASIS_NAME = re.compile(r"case_(?P<subject>.+?)_slice_(?P<z>\d+)(?:\.nii)?\.png", re.IGNORECASE)
OASIS_SEG_NAME = re.compile(r"seg_(?P<subject>.+?)_slice_(?P<z>\d+)(?:\.nii)?\.png", re.IGNORECASE)
FOLDER_SPLITS = {"train": ("train",), "validate": ("validate", "val", "valid", "validation"), "test": ("test",)}
SEG_LEVELS = np.array([85, 170, 255], dtype=np.uint8)  # CSF, grey matter, white matter (OASIS seg PNGs)
LABELS = ("background", "CSF", "grey matter", "white matter")  # class k is seg PNG level SEG_CLASS_LEVELS[k]
SEG_CLASS_LEVELS = np.array([0, 85, 170, 255], dtype=np.uint8)
DEMO_SUBJECTS = 64
DEMO_STATS = "embedded.json"


# ----------------------------------------------------------------------------------------------
# Errors and the in-memory split


class DataError(UserError):
    """A data problem, shown to the user as one line `<path>: <what is wrong>`."""

    def __init__(self, path, problem=None):
        """`DataError(path, problem)` -> "path: problem"; `DataError(message)` keeps the message."""
        super().__init__(str(path) if problem is None else f"{path}: {problem}")


@dataclass
class SliceSet:
    """One split, fully decoded in memory (later epochs index these arrays and decode nothing)."""

    images: np.ndarray  # uint8 [N, S, S]
    z: np.ndarray  # int64 [N], -1 where unknown
    subjects: np.ndarray  # str [N]
    paths: list  # source file of each slice
    split: str
    source: str  # 'oasis' | 'nifti' | 'folder'
    num_z: int  # z-indices run 0..num_z-1; 0 when unconditional
    size: int
    notes: list = field(default_factory=list)
    disk_sizes: dict = field(default_factory=dict)  # "HxW" (or volume shape) on disk -> count
    labels: np.ndarray = None  # uint8 [N, S, S] tissue classes 0..3 (LABELS), where loaded with labels=True

    @property
    def conditional(self):
        """True when every slice has a known z-index."""
        return self.num_z > 0

    def __len__(self):
        """Number of slices."""
        return len(self.images)

    def tensors(self):
        """(uint8 [N, 1, S, S], long [N]) sharing memory with the arrays, for fast batch indexing."""
        return torch.from_numpy(self.images).unsqueeze(1), torch.from_numpy(self.z)

    def neighbours(self):
        """(below, above): long [N] indices of the same subject's slice at z-1 and at z+1, -1 where there is none
        (the ends of a stack, a missing slice, or no z-index)."""
        index = {(s, int(z)): i for i, (s, z) in enumerate(zip(self.subjects, self.z)) if z >= 0}
        below = [index.get((s, int(z) - 1), -1) if z >= 0 else -1 for s, z in zip(self.subjects, self.z)]
        above = [index.get((s, int(z) + 1), -1) if z >= 0 else -1 for s, z in zip(self.subjects, self.z)]
        return torch.tensor(below, dtype=torch.long), torch.tensor(above, dtype=torch.long)

    def stacks(self):
        """(uint8 [S, K, H, W], subject ids) of the subjects that have every z-index 0..K-1, slices in z order."""
        by_subject = {}
        for i, (s, z) in enumerate(zip(self.subjects, self.z)):
            if z >= 0:
                by_subject.setdefault(s, {})[int(z)] = i
        whole = [s for s in sorted(by_subject) if len(by_subject[s]) == self.num_z > 0
                 and set(by_subject[s]) == set(range(self.num_z))]
        order = [[by_subject[s][z] for z in range(self.num_z)] for s in whole]
        return self.images[np.array(order, dtype=np.int64).reshape(len(whole), self.num_z)], whole


class SliceDataset(torch.utils.data.Dataset):
    """A SliceSet as a torch Dataset: item i -> (float [1, S, S] in [-1, 1], int z)."""

    def __init__(self, slices):
        """Wrap a SliceSet (no copy)."""
        self.slices = slices
        self.images, self.z = slices.tensors()

    def __len__(self):
        """Number of slices."""
        return len(self.images)

    def __getitem__(self, i):
        """(float [1, S, S] in [-1, 1], int z) of slice i."""
        return to_float(self.images[i]), int(self.z[i])


# ----------------------------------------------------------------------------------------------
# Finding files and telling layouts apart


def _is_junk(path):
    """OS clutter (.DS_Store, ._* resource forks, Thumbs.db, __MACOSX) that is skipped silently."""
    return path.name.startswith(".") or path.name.lower() in JUNK_NAMES


def _entries(folder):
    """Sorted entries of a folder; an unreadable folder is a DataError naming it."""
    try:
        return sorted(Path(folder).iterdir())
    except OSError as err:
        raise DataError(folder, f"cannot list the folder ({err.strerror or err})") from None


def _files(folder, recursive=False):
    """Sorted regular files under `folder`, clutter left out (and clutter folders not entered)."""
    found = []
    for entry in _entries(folder):
        if _is_junk(entry):
            continue
        if entry.is_file():
            found.append(entry)
        elif recursive and entry.is_dir():
            found.extend(_files(entry, recursive=True))
    return found


def _subdirs(folder):
    """Sorted non-clutter subfolders."""
    return [p for p in _entries(folder) if p.is_dir() and not _is_junk(p)]


def _volume_ext(path):
    """The volume extension of `path` ('.nii.gz', '.nii', '.img') or None."""
    name = path.name.lower()
    return next((ext for ext in VOLUME_EXTS if name.endswith(ext)), None)


def _is_image(path):
    """True for the 2-D image formats a plain folder may hold."""
    return path.suffix.lower() in IMAGE_EXTS


def _has_oasis_tree(folder):
    """True when `folder` directly holds keras_png_slices_* split folders."""
    return any(OASIS_TREE.fullmatch(p.name) for p in _subdirs(folder))


def detect_layout(path):
    """('oasis' | 'nifti' | 'folder', the root actually used) for a data folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if not path.is_dir():
        raise DataError(path, "not a folder (give the folder that holds the data)")
    if OASIS_TREE.fullmatch(path.name):
        path = path.parent  # pointed at one split folder: use the tree around it
    # The archive extracts to keras_png_slices_data/keras_png_slices_data/...: look two levels down.
    level = [path]
    for _ in range(3):
        hits = [p for p in level if _has_oasis_tree(p)]
        if len(hits) > 1:
            raise DataError(path, f"holds more than one OASIS tree ({', '.join(str(h) for h in hits)}); point at one")
        if hits:
            return "oasis", hits[0]
        level = [sub for p in level for sub in _subdirs(p)]
    files = _files(path, recursive=True)
    if not files:
        raise DataError(path, "folder is empty")
    if any(_volume_ext(f) for f in files):
        return "nifti", path
    if any(_is_image(f) for f in files):
        return "folder", path
    raise DataError(path, "nothing recognisable: expected keras_png_slices_{train,validate,test} folders, "
                          "NIfTI/Analyze volumes (.nii, .nii.gz, .img+.hdr) or images (png, jpg, bmp, tif)")


def split_subjects(subjects, seed=0, fractions=None):
    """Map each subject id to a split: seeded permutation of the sorted ids, >= 1 per split from 3 ids."""
    fractions = fractions or FRACTIONS
    ids = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(ids))
    n = len(ids)
    n_val = round(fractions["validate"] * n)
    n_test = round(fractions["test"] * n)
    if n >= 3:
        n_val, n_test = max(1, n_val), max(1, n_test)
    n_train = n - n_val - n_test
    names = ["train"] * n_train + ["validate"] * n_val + ["test"] * n_test
    return {ids[i]: names[rank] for rank, i in enumerate(order)}


# ----------------------------------------------------------------------------------------------
# Decoding 2-D images


def fit_square(arr, size, nearest=False):
    """Zero-pad a uint8 [H, W] image to a centred square (MRI background is black), then resize (`nearest`: by
    nearest neighbour, for label maps, whose classes must never be averaged)."""
    h, w = arr.shape
    if h != w:
        side = max(h, w)
        square = np.zeros((side, side), dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top:top + h, left:left + w] = arr
        arr = square
    if arr.shape[0] == size:
        return arr
    # BOX is an exact area average when shrinking (256 -> 64 is a 4x4 mean): no aliasing and, unlike
    # LANCZOS, no ringing halo at the sharp brain/background edge. Bilinear never overshoots when growing.
    im = Image.fromarray(arr)
    if nearest:
        return np.asarray(im.resize((size, size), Image.NEAREST))
    if arr.shape[0] % size == 0:
        return np.asarray(im.reduce(arr.shape[0] // size))  # the same block mean, ~5x faster
    filt = Image.BOX if arr.shape[0] > size else Image.BILINEAR
    return np.asarray(im.resize((size, size), filt))


def _to_gray8(im):
    """PIL image -> (uint8 [H, W], conversion kind or None). High bit depths are scaled by their own max."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im), None
    if mode.startswith("I") or mode == "F":
        # Scaling by each image's own max keeps the full contrast of 12/16-bit scans (clipping at 255
        # would turn most of a 16-bit brain white).
        arr = np.asarray(im).astype(np.float64)
        arr = np.clip(arr, 0, None)
        peak = arr.max()
        arr = np.round(arr * (255.0 / peak)) if peak > 0 else arr
        return arr.astype(np.uint8), "16-bit" if mode.startswith("I;16") else f"mode {mode}"
    kind = "RGB" if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV") else f"mode {mode}"
    return np.asarray(im.convert("L")), kind


def _read_image(path):
    """Decode one image file to uint8 [H, W] grayscale; a corrupt file is a DataError naming it."""
    try:
        with Image.open(path) as im:
            im.load()
            return _to_gray8(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(path, f"unreadable or corrupt image ({err})") from None


def _decode_all(paths, size, desc):
    """Decode image files in a thread pool (PIL releases the GIL) into uint8 [N, size, size]."""
    images = np.zeros((len(paths), size, size), dtype=np.uint8)
    disk = [None] * len(paths)
    kinds = [None] * len(paths)

    def work(i):
        """Decode file i into row i (threads write disjoint rows)."""
        arr, kinds[i] = _read_image(paths[i])
        disk[i] = f"{arr.shape[0]}x{arr.shape[1]}"
        images[i] = fit_square(arr, size)

    workers = min(8, (os.cpu_count() or 1) + 2)
    ex = ThreadPoolExecutor(workers)
    try:
        for _ in tqdm(ex.map(work, range(len(paths))), total=len(paths), desc=desc, unit="img",
                      disable=None if len(paths) > 2000 else True, leave=False):
            pass
    except BaseException:
        ex.shutdown(wait=True, cancel_futures=True)
        raise
    ex.shutdown()
    disk_sizes = dict(Counter(disk))
    return images, _decode_notes(kinds, disk_sizes, size), disk_sizes


def _decode_notes(kinds, disk_sizes, size):
    """Human-readable notes on conversions and resizes done while decoding."""
    notes = []
    for kind, n in sorted(Counter(k for k in kinds if k).items()):
        how = "scaled by each image's own maximum to 8-bit" if kind == "16-bit" or kind.startswith("mode I") \
            or kind == "mode F" else "converted to 8-bit grayscale"
        notes.append(f"{n} of {len(kinds)} images were {kind}: {how}")
    if len(disk_sizes) > 1:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(disk_sizes.items(), key=lambda kv: -kv[1]))
        notes.append(f"mixed slice sizes on disk: {listed}; all padded to square and resized to {size}x{size}")
    elif disk_sizes:
        (shape,) = disk_sizes
        h, w = map(int, shape.split("x"))
        if h != w:
            notes.append(f"slices are {shape} on disk: zero-padded to square, then resized to {size}x{size}")
        elif h != size:
            notes.append(f"slices are {shape} on disk: resized to {size}x{size}")
    return notes


# ----------------------------------------------------------------------------------------------
# Source 1: the OASIS PNG layout


def _oasis_index(root):
    """Per split, the sorted (subject, z, path) of its slices (None where the folder is missing)."""
    index, notes, owner = {}, [], {}
    for split in SPLITS:
        folder = root / OASIS_DIR.format(split)
        if not folder.is_dir():
            index[split] = None
            continue
        seen, skipped = {}, []
        for f in _files(folder):
            m = OASIS_NAME.fullmatch(f.name)
            if not m:
                skipped.append(f.name)
                continue
            key = (m["subject"], int(m["z"]))
            if key in seen:
                raise DataError(folder, f"duplicate slice: subject {key[0]} z {key[1]} is in both "
                                        f"{seen[key].name} and {f.name}")
            seen[key] = f
        if skipped:
            notes.append(f"{split}: skipped {len(skipped)} files not named case_<subject>_slice_<z>.nii.png "
                         f"(e.g. {skipped[0]})")
        for (subject, _), f in seen.items():
            if subject in owner and owner[subject][0] != split:
                first, example = owner[subject]
                raise DataError(root, f"subject {subject} is in both {OASIS_DIR.format(first)} ({example.name}) "
                                      f"and {OASIS_DIR.format(split)} ({f.name}): splits must not share subjects")
            owner.setdefault(subject, (split, f))
        index[split] = [(s, z, seen[(s, z)]) for s, z in sorted(seen)]
    return index, notes


def _oasis_seg_counts(root):
    """Number of seg PNGs per split folder that exists (empty dict when there are no seg maps)."""
    counts = {}
    for split in SPLITS:
        folder = root / OASIS_SEG_DIR.format(split)
        if folder.is_dir():
            counts[split] = sum(1 for f in _files(folder) if OASIS_SEG_NAME.fullmatch(f.name))
    return counts


def _require_split(items, split, folder):
    """Raise a DataError naming the split folder when it is missing or holds no images."""
    if items is None:
        raise DataError(folder, f"the {split} split folder is missing")
    if not items:
        raise DataError(folder, f"the {split} split has no images")


def _seg_pixels(path):
    """The grey levels of a seg PNG as uint8 [H, W]; a DataError naming the file where it cannot be read."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "F") or im.mode.startswith("I;"):  # 16-bit / 32-bit: convert("L") would clip
                wide = np.asarray(im)
                if wide.min() < 0 or wide.max() > 255:
                    raise DataError(path, f"holds levels up to {wide.max():g} (a {im.mode} image); a seg map has "
                                          f"only 0, 85, 170, 255 ({', '.join(LABELS)}) or the classes 0..3")
                return wide.astype(np.uint8)
            return np.asarray(im if im.mode == "L" else im.convert("L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(path, f"unreadable or corrupt seg map ({err})") from None


def _levels_to_classes(arr, path):
    """OASIS seg levels 0/85/170/255 -> classes 0..3; any other level is a DataError naming the file."""
    stray = np.setdiff1d(np.unique(arr), SEG_CLASS_LEVELS)
    if stray.size:
        raise DataError(path, f"holds levels {', '.join(map(str, stray[:5]))}{' ...' if stray.size > 5 else ''}; "
                              f"an OASIS seg map has only 0, 85, 170, 255 ({', '.join(LABELS)})")
    classes = np.zeros(256, dtype=np.uint8)
    classes[SEG_CLASS_LEVELS] = np.arange(len(LABELS), dtype=np.uint8)
    return classes[arr]


def _read_seg(path, image_path, size):
    """One OASIS seg PNG as tissue classes uint8 [size, size] (0..3, see LABELS), checked against its image: the
    same size on disk, and only the four OASIS levels; else a DataError naming the seg file."""
    arr = _seg_pixels(path)
    try:
        with Image.open(image_path) as im:
            width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(image_path, f"unreadable or corrupt image ({err})") from None
    if arr.shape != (height, width):
        raise DataError(path, f"seg map is {arr.shape[0]}x{arr.shape[1]} but its image {image_path.name} is "
                              f"{height}x{width}")
    return fit_square(_levels_to_classes(arr, path), size, nearest=True)


def read_label_map(path, size=None):
    """A tissue map given by hand (e.g. `sample --labels`): a PNG of the OASIS seg levels 0/85/170/255 (as
    `sample` writes them) or of the classes 0..3, as uint8 classes [size, size] (padded square, resized by
    nearest neighbour; size None: its longer side); a DataError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "no such tissue map (a PNG of the seg levels 0/85/170/255 or the classes 0..3)")
    arr = _seg_pixels(path)
    classes = arr if np.isin(arr, np.arange(len(LABELS))).all() else _levels_to_classes(arr, path)
    size = size or max(classes.shape)
    if classes.shape != (size, size):
        print(f"note: tissue map {path} is {classes.shape[0]}x{classes.shape[1]}: padded square and resized to "
              f"{size}x{size} by nearest neighbour")
    return np.array(fit_square(classes, size, nearest=True))  # a writable copy (torch warns on read-only arrays)


def _load_oasis_labels(root, split, items, size):
    """Tissue classes [N, size, size] aligned with a split's slices `items` (subject, z, path), or None where the
    split has no seg folder; a seg map without its image, or an image without its seg map, is a DataError."""
    folder = root / OASIS_SEG_DIR.format(split)
    if not folder.is_dir():
        return None
    seen = {}
    for f in _files(folder):
        m = OASIS_SEG_NAME.fullmatch(f.name)
        if m:
            seen[(m["subject"], int(m["z"]))] = f
    keys = {(subject, z) for subject, z, _ in items}
    orphans = sorted(set(seen) - keys)
    if orphans:
        raise DataError(seen[orphans[0]], f"seg map without its image (no case_{orphans[0][0]}_slice_{orphans[0][1]}"
                                          f".nii.png in {OASIS_DIR.format(split)}; {len(orphans)} such)")
    missing = [(subject, z, path) for subject, z, path in items if (subject, z) not in seen]
    if missing:
        subject, z, path = missing[0]
        raise DataError(folder, f"no seg map for {path.name} (expected seg_{subject}_slice_{z}.nii.png; "
                                f"{len(missing)} of {len(items)} slices have none)")
    labels = np.zeros((len(items), size, size), dtype=np.uint8)

    def work(i):
        subject, z, path = items[i]
        labels[i] = _read_seg(seen[(subject, z)], path, size)

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 2)) as ex:
        list(ex.map(work, range(len(items))))
    return labels


def _load_oasis(root, size, splits, labels=False):
    """Decode the requested OASIS splits (and their seg maps, with `labels`)."""
    index, notes = _oasis_index(root)
    present = [z for items in index.values() if items for _, z, _ in items]
    num_z = max(present) + 1 if present else 0
    out = {}
    for split in splits:
        items = index[split]
        _require_split(items, split, root / OASIS_DIR.format(split))
        paths = [p for _, _, p in items]
        images, dec_notes, disk = _decode_all(paths, size, f"decode {split}")
        per_subject = Counter(s for s, _, _ in items)
        short = sorted(s for s, n in per_subject.items() if n < num_z)
        extra = [f"{len(short)} subjects have fewer than {num_z} slices (e.g. {short[0]})"] if short else []
        out[split] = SliceSet(images, np.array([z for _, z, _ in items], dtype=np.int64),
                              np.array([s for s, _, _ in items], dtype=str), [str(p) for p in paths],
                              split, "oasis", num_z, size, notes + dec_notes + extra, disk,
                              _load_oasis_labels(root, split, items, size) if labels else None)
    return out


# ----------------------------------------------------------------------------------------------
# Source 2: NIfTI / Analyze volumes


LABEL_SUFFIX = "_seg"  # NAME_seg.nii.gz beside NAME.nii.gz: that subject's tissue labels
# where tissue maps come from, for the messages of whatever needs them
LABEL_SOURCES = f"OASIS keras_png_slices_seg_*, a NAME{LABEL_SUFFIX}.nii.gz beside each volume, or the embedded set"


def _nifti_volumes(root):
    """(subject, path) of every image volume and {subject: path} of the label volumes (NAME_seg beside NAME);
    subject = relative path without extension. A label volume without its image is a DataError."""
    volumes, labels = [], {}
    for f in _files(root, recursive=True):
        ext = _volume_ext(f)
        if ext is None:
            continue
        if ext == ".img" and not f.with_suffix(".hdr").exists() and not f.with_suffix(".HDR").exists():
            raise DataError(f, "Analyze .img volume without its .hdr header beside it")
        name = f.relative_to(root).as_posix()[: -len(ext)]
        if name.endswith(LABEL_SUFFIX):
            labels[name[: -len(LABEL_SUFFIX)]] = f
        else:
            volumes.append((name, f))
    orphans = sorted(set(labels) - {name for name, _ in volumes})
    if orphans:
        raise DataError(labels[orphans[0]], f"label volume without its image (no {Path(orphans[0]).name} volume "
                                            f"beside it)")
    return volumes, labels


def _nifti_index(root, seed):
    """Per split, the sorted (subject, path) of its image volumes (label volumes are not subjects)."""
    volumes, _ = _nifti_volumes(root)
    first = {}
    for subject, f in volumes:
        if subject in first:
            raise DataError(root, f"two volumes for subject {subject}: {first[subject].name} and {f.name}")
        first[subject] = f
    assignment = split_subjects([s for s, _ in volumes], seed)
    return {split: [(s, f) for s, f in volumes if assignment[s] == split] for split in SPLITS}


def _read_volume(path):
    """(3-D float32 array in canonical RAS, affine, shape on disk, notes) of one volume file."""
    import nibabel as nib

    try:
        raw = nib.load(str(path))
        shape = "x".join(map(str, raw.shape))
        img = nib.as_closest_canonical(raw)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:  # noqa: BLE001 - nibabel/zlib raise many types; all mean the same to the user
        raise DataError(path, f"unreadable or corrupt volume ({type(err).__name__}: {err})") from None
    notes = []
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        notes.append("4-D volume: used the first volume")
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(path, f"expected a 3-D volume, found shape {shape}")
    bad = int(data.size - np.isfinite(data).sum())
    if bad:
        notes.append(f"{bad} NaN or infinite voxels read as background (0)")
    return np.nan_to_num(data, copy=False, nan=0.0, posinf=0.0, neginf=0.0), img.affine, shape, notes


MAX_VOXEL_RATIO = 20  # in-plane voxel aspect beyond which an affine is taken for a broken header


def _volume_slices(path, num_slices, size, label_path=None):
    """K axial slices of one volume as uint8 [K, size, size], notes (no file name), the shape on disk, and the
    same K slices of its label volume as tissue classes (None without `label_path`)."""
    data, affine, shape, notes = _read_volume(path)
    mask = data != 0
    if not mask.any():
        raise DataError(path, "volume is all zero")
    axial = np.flatnonzero(mask.any(axis=(0, 1)))  # canonical RAS: the last axis runs inferior -> superior
    lo, hi = int(axial[0]), int(axial[-1])
    if hi == lo:
        raise DataError(path, f"only one axial slice holds data (shape {shape}); need a 3-D brain volume")
    # Centres of K equal bins over the non-zero extent: the near-empty first and last slices are avoided.
    extent = hi - lo + 1
    picks = np.clip(np.floor(lo + (np.arange(num_slices) + 0.5) * extent / num_slices), lo, hi).astype(int)
    if extent < num_slices:
        notes.append(f"fewer non-empty axial slices than the {num_slices} requested: some repeat")
    p_lo, p_hi = (float(v) for v in np.percentile(data[mask], [0.5, 99.5]))
    if p_hi <= p_lo:  # (nearly) constant brain: show it as plain white rather than divide by zero
        p_lo, p_hi = p_lo - 1.0, p_lo
    # float64: the differences of extreme float32 voxels (up to +-3.4e38) would overflow to inf - inf = NaN
    scaled = np.clip((data[:, :, picks].astype(np.float64) - p_lo) / (p_hi - p_lo), 0, 1) * 255
    scaled[~mask[:, :, picks]] = 0  # keep the background black even when p_lo < 0
    scaled = np.round(scaled).astype(np.uint8)
    zooms = np.sqrt((affine[:3, :2] ** 2).sum(axis=0))
    if not (np.isfinite(zooms).all() and zooms.min() > 0 and zooms.max() <= MAX_VOXEL_RATIO * zooms.min()):
        raise DataError(path, f"in-plane voxel size {zooms[0]:.3g} x {zooms[1]:.3g} (from the affine) is not that of "
                              f"an MRI volume (zero, not finite, or more than {MAX_VOXEL_RATIO}:1)")
    if abs(zooms[0] - zooms[1]) > 0.01 * zooms.max():
        notes.append("non-square in-plane voxels: resampled to square pixels")
    labels = None if label_path is None else _axial(_label_classes(label_path, path, data.shape, affine)[:, :, picks],
                                                     zooms, size, nearest=True)
    return _axial(scaled, zooms, size), notes, shape, labels


def _axial(picked, zooms, size, nearest=False):
    """uint8 [x, y, K] picked axial planes -> [K, size, size] slices with square pixels (`nearest`: labels)."""
    out = np.zeros((picked.shape[2], size, size), dtype=np.uint8)
    for k in range(picked.shape[2]):
        sl = picked[:, :, k].T[::-1]  # rows run anterior (top) -> posterior, columns left -> right
        out[k] = fit_square(np.ascontiguousarray(_square_pixels(sl, zooms, nearest)), size, nearest)
    return out


def _label_classes(label_path, image_path, shape, affine):
    """A label volume as uint8 classes 0..3 (LABELS) on its image's canonical grid: labels 0..3, or the OASIS
    seg levels 0/85/170/255; a different grid or any other value is a DataError naming the label file."""
    data, label_affine, _, _ = _read_volume(label_path)
    if data.shape != shape or not np.allclose(label_affine, affine, atol=1e-3):
        grids = f"shape {'x'.join(map(str, data.shape))} vs {'x'.join(map(str, shape))}, or affines differ"
        raise DataError(label_path, f"label volume is not on the grid of its image {image_path.name} ({grids})")
    values = np.unique(data)
    for levels in (np.arange(len(LABELS)), SEG_CLASS_LEVELS):
        if np.isin(values, levels).all():
            return np.searchsorted(levels, data).astype(np.uint8)
    stray = values[~np.isin(values, np.arange(len(LABELS)))][:5]
    raise DataError(label_path, f"holds values {', '.join(f'{v:g}' for v in stray)}; labels must be 0..3 "
                                f"({', '.join(LABELS)}) or the OASIS levels 0, 85, 170, 255")


def _square_pixels(sl, zooms, nearest=False):
    """Resample an axial slice (rows = y, columns = x) so its pixels are square in millimetres."""
    zx, zy = float(zooms[0]), float(zooms[1])
    if abs(zx - zy) <= 0.01 * max(zx, zy):
        return sl
    fine = min(zx, zy)
    h, w = sl.shape
    shape = (max(1, round(w * zx / fine)), max(1, round(h * zy / fine)))
    return np.asarray(Image.fromarray(sl).resize(shape, Image.NEAREST if nearest else Image.BILINEAR))


def _group_notes(named_notes):
    """[(file name, note)] -> one line per distinct note, naming the file or counting the files."""
    by_note = {}
    for name, note in named_notes:
        by_note.setdefault(note, []).append(name)
    return [f"{names[0]}: {note}" if len(names) == 1 else f"{len(names)} volumes (e.g. {names[0]}): {note}"
            for note, names in by_note.items()]


def _nifti_label_paths(root, index, splits):
    """Per subject of the requested splits its label volume, or None where the data has no label volumes; where
    only some subjects have one, a DataError names the first without."""
    _, labels = _nifti_volumes(root)
    if not labels:
        return None
    wanted = [(s, f) for split in splits for s, f in index[split]]
    missing = [(s, f) for s, f in wanted if s not in labels]
    if missing:
        s, f = missing[0]
        raise DataError(f, f"no label volume beside it (expected {Path(s).name}{LABEL_SUFFIX}{_volume_ext(f)}; "
                           f"{len(missing)} of {len(wanted)} volumes have none)")
    return labels


def _load_nifti(root, size, splits, num_slices, seed, labels=False):
    """Read each needed volume once (and its label volume, with `labels`) and return the requested splits."""
    index = _nifti_index(root, seed)
    total = sum(len(v) for v in index.values())
    for split in splits:
        if not index[split]:
            raise DataError(root, f"the {split} split has no volumes ({total} subjects found; "
                                  f"at least 3 are needed for train/validate/test)")
    label_paths = _nifti_label_paths(root, index, splits) if labels else None
    jobs = [(split, s, p) for split in splits for s, p in index[split]]

    def read(job):
        return _volume_slices(job[2], num_slices, size, label_paths[job[1]] if label_paths else None)
    with ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as ex:
        results = list(tqdm(ex.map(read, jobs), total=len(jobs), desc="read volumes", unit="vol",
                            disable=None if len(jobs) > 20 else True, leave=False))
    out = {}
    for split in splits:
        picked = [(job, res) for job, res in zip(jobs, results) if job[0] == split]
        notes = _group_notes([(job[2].name, note) for job, res in picked for note in res[1]])
        disk = dict(Counter(res[2] for _, res in picked))
        images = np.concatenate([res[0] for _, res in picked])
        subjects = np.repeat(np.array([s for (_, s, _), _ in picked], dtype=str), num_slices)
        paths = [str(p) for (_, _, p), _ in picked for _ in range(num_slices)]
        z = np.tile(np.arange(num_slices, dtype=np.int64), len(picked))
        notes.append(f"volumes: {num_slices} axial slices each over the non-zero extent, "
                     f"intensities scaled by the 0.5/99.5th percentiles of non-zero voxels, resized to {size}x{size}")
        tissue = np.concatenate([res[3] for _, res in picked]) if label_paths else None
        out[split] = SliceSet(images, z, subjects, paths, split, "nifti", num_slices, size, notes, disk, tissue)
    return out


# ----------------------------------------------------------------------------------------------
# Source 3: a plain folder of images


def _folder_index(root, seed):
    """(per split the sorted (subject, path) of its images, notes, per split the folder it comes from)."""
    subdirs = {p.name.lower(): p for p in _subdirs(root)}
    named = {split: next((subdirs[a] for a in aliases if a in subdirs), None)
             for split, aliases in FOLDER_SPLITS.items()}
    notes = []
    if any(named.values()):
        index = {}
        for split, folder in named.items():
            if folder is None:
                index[split] = None
                continue
            files = _files(folder, recursive=True)
            index[split] = [(f.relative_to(root).as_posix(), f) for f in files if _is_image(f)]
            other = [f for f in files if not _is_image(f)]
            if other:
                notes.append(f"{split}: skipped {len(other)} files that are not images (e.g. {other[0].name})")
        loose = [f for f in _files(root) if _is_image(f)]
        if loose:
            notes.append(f"ignored {len(loose)} images beside the split subfolders (e.g. {loose[0].name})")
        folders = {s: named[s] or root / FOLDER_SPLITS[s][0] for s in SPLITS}
        return index, notes, folders
    files = _files(root, recursive=True)
    images = [(f.relative_to(root).as_posix(), f) for f in files if _is_image(f)]
    other = [f for f in files if not _is_image(f)]
    if other:
        notes.append(f"skipped {len(other)} files that are not images (e.g. {other[0].name})")
    assignment = split_subjects([s for s, _ in images], seed)
    notes.append(f"no train/validate/test subfolders: {len(images)} images split by file (seed {seed})")
    index = {split: [(s, f) for s, f in images if assignment[s] == split] for split in SPLITS}
    return index, notes, dict.fromkeys(SPLITS, root)


def _load_folder(root, size, splits, seed):
    """Decode the requested splits of a plain image folder (unconditional: z = -1)."""
    index, notes, folders = _folder_index(root, seed)
    out = {}
    for split in splits:
        items = index[split]
        _require_split(items, split, folders[split])
        paths = [p for _, p in items]
        images, dec_notes, disk = _decode_all(paths, size, f"decode {split}")
        subjects = np.array([s for s, _ in items], dtype=str)
        out[split] = SliceSet(images, np.full(len(items), -1, dtype=np.int64), subjects,
                              [str(p) for p in paths], split, "folder", 0, size,
                              notes + dec_notes + ["plain images: z-index unknown (-1), conditioning off"], disk)
    return out


# ----------------------------------------------------------------------------------------------
# The one entry point


def _check_args(size, splits):
    """Refuse sizes and split names the rest of the repo does not support."""
    if size not in SIZES:
        raise UserError(f"--size {size}: must be one of {', '.join(map(str, SIZES))}")
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}': expected one of {', '.join(SPLITS)}")


def load_splits(path, size=64, splits=SPLITS, num_slices=32, seed=0, labels=False):
    """{split: SliceSet} for the requested splits of any source (NIfTI volumes are read once for all). With
    `labels`, each split's tissue maps too (`SliceSet.labels`; None where the data has none: plain image folders
    never do)."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    _check_args(size, splits)
    if num_slices < 1:
        raise UserError(f"--num-slices {num_slices}: must be at least 1")
    kind, root = detect_layout(path)
    if kind == "oasis":
        return _load_oasis(root, size, splits, labels)
    if kind == "nifti":
        return _load_nifti(root, size, splits, num_slices, seed, labels)
    return _load_folder(root, size, splits, seed)


def load_split(path, split, size=64, num_slices=32, seed=0, labels=False):
    """One split of any source as a SliceSet."""
    return load_splits(path, size, (split,), num_slices, seed, labels)[split]


# ----------------------------------------------------------------------------------------------
# Volumes out: generated subjects as NIfTI


def voxel_spacing(path, size, num_slices=32):
    """((x, y, z) voxel size in mm of slices loaded from `path` at `size`, how it was found).

    The embedded set knows its geometry; a NIfTI folder's first volume gives it (in-plane: the square field of
    view over `size` pixels; z: the brain's axial extent over the K slices taken from it); OASIS PNGs and
    plain images record none, so OASIS-1's 1 mm at 256 pixels is assumed in plane and for the slice gap too.
    """
    kind, root = detect_layout(path)
    if (root / DEMO_STATS).is_file():
        (_, _), (_, _), (z0, z1) = _mni_maps()[1]
        pitch = _pitch(size)[0]
        return (pitch, pitch, 0.72 * float(z1 - z0) / max(num_slices - 1, 1)), "the embedded set's geometry"
    if kind == "nifti":
        first = next(f for split in _nifti_index(root, 0).values() for _, f in split)
        data, affine, _, _ = _read_volume(first)
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        axial = np.flatnonzero((data != 0).any(axis=(0, 1)))
        fov = max(data.shape[0] * zooms[0], data.shape[1] * zooms[1])
        extent = (axial[-1] - axial[0] + 1) * zooms[2] if len(axial) else data.shape[2] * zooms[2]
        return tuple(float(v) for v in (fov / size, fov / size, extent / num_slices)), f"the header of {first.name}"
    pitch = 256 / size
    return (pitch, pitch, pitch), "assumed (PNG slices record no voxel size): 1 mm at 256 pixels, as in OASIS-1"


def write_volume(slices, path, spacing):
    """Write uint8 axial slices [K, H, W] (rows anterior -> posterior, columns left -> right, z bottom -> top,
    as `load_splits` returns them) as a NIfTI volume in RAS orientation with voxel size `spacing` (mm),
    centred on the origin. `load_splits` on a folder of these reads the slices back in place, with two changes of
    its own: intensities re-scaled to the volume's percentiles, and the K slices re-picked over the non-zero
    axial extent (the same slices unless an end slice is all zero)."""
    import nibabel as nib

    slices = np.asarray(slices)
    if slices.ndim != 3 or slices.dtype != np.uint8:
        raise ValueError(f"expected uint8 slices [K, H, W], got {slices.dtype} {slices.shape}")
    data = np.ascontiguousarray(slices[:, ::-1, :].transpose(2, 1, 0))  # [x, y, z]: inverse of _volume_slices
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.array(data.shape) - 1) / 2 * np.array(spacing, dtype=float)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # both set, so that every viewer (ITK-based or FSL) places it the same way
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


# ----------------------------------------------------------------------------------------------
# The embedded dataset: a pseudo-cohort from the MNI ICBM152 2009a template


def default_data_dir(size):
    """Where the embedded dataset at `size` lives: data/embedded_<size> beside this file."""
    return Path(__file__).resolve().parent / "data" / f"embedded_{size}"


def _shown(path):
    """`path` relative to the working directory when it is inside it (shorter messages)."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def ensure_dataset(path, size):
    """The data folder to use: `path` if given (it must exist), else the embedded set, built once."""
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise DataError(path, "no such file or folder")
        return path
    out = default_data_dir(size)
    if not (out / DEMO_STATS).exists():
        print(f"no --data given: building the embedded MNI dataset at {_shown(out)} (once)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: an interrupted build never leaves a half dataset behind.
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            build_demo(tmp, size=size, subjects=DEMO_SUBJECTS)
            if not (out / DEMO_STATS).exists():  # else another process finished first with the same bytes
                if out.exists():
                    shutil.rmtree(out)  # a leftover without its stats file is an incomplete build
                os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _template_dir():
    """The folder inside the nilearn wheel that holds the MNI ICBM152 2009a maps."""
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


@lru_cache(maxsize=1)
def _mni_maps():
    """(MNI T1/GM/WM maps as float32 on the 1 mm RAS grid, brain voxel box [(lo, hi)] * 3, lowest brain T1)."""
    import nibabel as nib

    maps = {}
    for name in ("t1", "gm", "wm"):
        path = _template_dir() / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.exists():
            raise UserError(f"{path}: MNI template missing from the nilearn install (reinstall nilearn==0.14.1)")
        img = nib.as_closest_canonical(nib.load(str(path)))
        if not np.allclose(np.abs(np.diag(img.affine)[:3]), 1):
            raise UserError(f"{path}: expected 1 mm voxels, found affine {img.affine.tolist()}")
        maps[name] = np.asarray(img.dataobj, dtype=np.float32)
    brain = maps["t1"] > 0
    box = []
    for axis in range(3):
        hits = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(hits[0]), int(hits[-1])))
    return maps, box, float(maps["t1"][brain].min())


@lru_cache(maxsize=4)
def _template(pool):
    """({'t1': float32, 'labels': uint8 0..3}, box, floor) on the 1 mm grid mean-pooled by `pool`."""
    maps, box, floor = _mni_maps()
    if pool > 1:
        # A box prefilter at the output pixel pitch: sampling the 1 mm template every 3+ mm would alias.
        pooled = {}
        for name, vol in maps.items():
            for axis in range(3):
                n = vol.shape[axis] - vol.shape[axis] % pool
                vol = np.take(vol, np.arange(n), axis=axis)
                vol = vol.reshape(vol.shape[:axis] + (n // pool, pool) + vol.shape[axis + 1:]).mean(axis=axis + 1)
            pooled[name] = np.ascontiguousarray(vol, dtype=np.float32)
        maps = pooled
    # Labels are decided once on the template grid and sampled nearest-neighbour: interpolating a
    # label map would invent classes. CSF = inside the brain but neither grey nor white matter dominant.
    csf = np.clip(255 - maps["gm"] - maps["wm"], 0, None)
    labels = np.argmax(np.stack([csf, maps["gm"], maps["wm"]]), axis=0).astype(np.uint8) + 1
    labels[maps["t1"] < 0.5 * floor] = 0
    return {"t1": maps["t1"], "labels": labels}, box, floor


def _smooth_field(rng, grids, n_ctrl, sigma, channels):
    """A smooth random field [channels, K, H, W]: Gaussian bumps on a coarse control grid, summed."""
    # Separable, so it costs a few small matrix products instead of a 3-D upsampling per subject.
    bases = []
    for coords, n in zip(grids, n_ctrl):
        centres = np.linspace(coords.min(), coords.max(), n)
        width = (centres[1] - centres[0]) if n > 1 else 1e9
        bases.append(np.exp(-0.5 * ((coords[:, None] - centres[None, :]) / width) ** 2).astype(np.float32))
    coef = rng.normal(0, sigma, size=(*n_ctrl, channels)).astype(np.float32)
    return np.einsum("ka,jb,ic,abcd->dkji", bases[0], bases[1], bases[2], coef, optimize=True)


def _pitch(size):
    """(output pixel pitch in mm, template pooling factor) for an output size."""
    (x0, x1), (y0, y1), _ = _mni_maps()[1]
    # Field of view 1.25x the brain's longest in-plane extent: the brain fills most of the square
    # with a black margin even for the largest, most shifted subjects.
    pitch = 1.25 * max(x1 - x0, y1 - y0) / size
    return pitch, max(1, int(pitch))


def _subject_coords(rng, size, num_slices):
    """Template sampling coordinates [3, K, S, S] (pooled voxels) and a log bias field [K, S, S] for one subject."""
    (x0, x1), (y0, y1), (z0, z1) = _mni_maps()[1]
    pitch, pool = _pitch(size)
    # Output pixel centres in mm relative to the brain's centre; rows run anterior (top) to posterior.
    # Slices go from the lower cerebellum to the upper convexity, like the 32 OASIS slices.
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1) / 2])
    zs = np.linspace(z0 + 0.18 * (z1 - z0), z0 + 0.9 * (z1 - z0), num_slices) - centre[2]
    cols = (np.arange(size) - (size - 1) / 2) * pitch
    rows = ((size - 1) / 2 - np.arange(size)) * pitch
    # Small affine (output -> template): a few degrees about each axis, scale, shift in mm.
    ax, ay, az = np.deg2rad(rng.uniform(-4, 4, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    scale = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, 3)
    mat = rz @ ry @ rx / scale[None, :]  # a bigger subject samples a smaller template region
    offset = centre + rng.uniform(-3, 3, 3)
    grids = (zs, rows, cols)
    coords = _smooth_field(rng, grids, (4, 6, 6), 2.5, 3)  # non-linear x, y, z displacement in mm
    log_bias = _smooth_field(rng, grids, (2, 3, 3), 0.12, 1)[0]
    # The affine part is separable along columns, rows and slices: add it as three broadcasts.
    for c in range(3):
        coords[c] += (mat[c, 0] * cols).astype(np.float32)[None, None, :]
        coords[c] += (mat[c, 1] * rows).astype(np.float32)[None, :, None]
        coords[c] += (mat[c, 2] * zs + offset[c]).astype(np.float32)[:, None, None]
    coords -= (pool - 1) / 2  # 1 mm voxel index (the template is 1 mm RAS) -> index on the pooled grid
    coords /= pool
    return coords, log_bias


def _appearance(rng, t1, log_bias, floor):
    """Scanner-like uint8 image from warped template T1: contrast (gamma), bias field, noise, scaling."""
    gamma = np.exp(rng.uniform(-0.25, 0.25))
    img = (np.clip(t1, 0, 255) * (1 / 255.0)) ** gamma * np.exp(log_bias)
    inside = t1 >= 0.5 * floor
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.01, 0.035)) * inside
    top = np.percentile(img[inside], 99.5) if inside.any() else 1.0
    img = np.clip(img * (255 * rng.uniform(0.9, 1.0) / top), 0, 255) * inside
    return np.round(img).astype(np.uint8)


def _pseudo_subject(index, seed, size, num_slices=32):
    """One pseudo-subject: (images uint8 [K, S, S], seg uint8 [K, S, S]) from the warped template."""
    from scipy import ndimage

    rng = np.random.default_rng([seed, index])
    maps, _, floor = _template(_pitch(size)[1])
    coords, log_bias = _subject_coords(rng, size, num_slices)
    t1 = ndimage.map_coordinates(maps["t1"], coords, order=1, output=np.float32, cval=0.0)
    labels = ndimage.map_coordinates(maps["labels"], coords, order=0, output=np.uint8, cval=0)
    seg = np.concatenate([[0], SEG_LEVELS]).astype(np.uint8)[labels]
    return _appearance(rng, t1, log_bias, floor), seg


def _write_subject(job):
    """Build one pseudo-subject and write its image and seg PNGs (runs in a worker process)."""
    index, subject, split, out, size, seed = job
    images, segs = _pseudo_subject(index, seed, size)
    image_dir, seg_dir = out / OASIS_DIR.format(split), out / OASIS_SEG_DIR.format(split)
    for z in range(len(images)):
        # compress_level 1: written once, decoded as fast as level 6, much quicker to write.
        Image.fromarray(images[z]).save(image_dir / f"case_{subject}_slice_{z}.nii.png", compress_level=1)
        Image.fromarray(segs[z]).save(seg_dir / f"seg_{subject}_slice_{z}.nii.png", compress_level=1)
    return split


def build_demo(out, size=256, subjects=DEMO_SUBJECTS, seed=0, workers=None, progress=True):
    """Write the embedded pseudo-cohort in the OASIS PNG layout under `out`; returns stats (with seconds)."""
    start = time.perf_counter()
    out = Path(out)
    if size not in SIZES:
        raise UserError(f"--size {size}: must be one of {', '.join(map(str, SIZES))}")
    if subjects < 3:
        raise UserError(f"--subjects {subjects}: need at least 3 (one per split)")
    if out.exists() and _has_oasis_tree(out):
        raise UserError(f"{out}: already holds keras_png_slices_* folders; remove them or choose another --out")
    width = max(3, len(str(subjects)))
    ids = [f"{i + 1:0{width}d}" for i in range(subjects)]
    assignment = split_subjects(ids, seed)
    for split in SPLITS:
        (out / OASIS_DIR.format(split)).mkdir(parents=True, exist_ok=True)
        (out / OASIS_SEG_DIR.format(split)).mkdir(parents=True, exist_ok=True)
    _template(_pitch(size)[1])  # load in the parent: forked workers share it instead of each rebuilding it
    jobs = [(i, sid, assignment[sid], out, size, seed) for i, sid in enumerate(ids)]
    if workers is None:
        # Forked workers start in milliseconds; below ~2 s of work one process is as quick.
        workers = min(os.cpu_count() or 1, 4) if subjects * size * size >= 16 * 64 * 64 else 1
    bar = dict(total=subjects, desc="build subjects", unit="subj", disable=None if progress else True, leave=False)
    if workers > 1:
        # fork shares the loaded template with the workers; elsewhere each worker loads its own copy.
        fork = "fork" in multiprocessing.get_all_start_methods()
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork") if fork else None) as ex:
            done = list(tqdm(ex.map(_write_subject, jobs), **bar))
    else:
        done = [_write_subject(job) for job in tqdm(jobs, **bar)]
    stats = {"out": str(out), "size": size, "subjects": subjects, "seed": seed, "slices_per_subject": 32,
             "subjects_per_split": {s: done.count(s) for s in SPLITS}, "workers": workers,
             "template": "MNI ICBM152 2009a sym (nilearn)", "seconds": round(time.perf_counter() - start, 2)}
    (out / DEMO_STATS).write_text(json.dumps(stats, indent=2) + "\n")
    return stats


# ----------------------------------------------------------------------------------------------
# Command line


def _batch_rate(slices, batch=128, seconds=0.3):
    """Slices/s reached by taking random uint8 batches out of `tensors()` (trainers convert on device)."""
    images, z = slices.tensors()
    gen = torch.Generator().manual_seed(0)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(len(images), (batch,), generator=gen)
        # index_select is ~10x faster than images[idx] (advanced indexing) on CPU.
        images.index_select(0, idx), z.index_select(0, idx)
        done += batch
    return done / (time.perf_counter() - start)


def _scan(kind, root, seed):
    """(per split its items or None, per split its folder, seg PNG counts) without decoding anything."""
    if kind == "oasis":
        return _oasis_index(root)[0], {s: root / OASIS_DIR.format(s) for s in SPLITS}, _oasis_seg_counts(root)
    if kind == "nifti":
        index, labels = _nifti_index(root, seed), _nifti_volumes(root)[1]
        counts = {split: sum(s in labels for s, _ in index[split]) for split in SPLITS} if labels else {}
        return index, dict.fromkeys(SPLITS, root), counts
    index, _, folders = _folder_index(root, seed)
    return index, folders, {}


def _print_sets(sets, seconds, size):
    """The per-split table, sizes on disk, speeds and notes of loaded splits."""
    print(f"{'split':<9} {'slices':>7} {'subjects':>9}  z-range")
    for split, s in sets.items():
        zr = f"{s.z.min()}..{s.z.max()}" if s.conditional else "unknown (-1): unconditional"
        print(f"{split:<9} {len(s):>7} {len(set(s.subjects)):>9}  {zr}")
    disk = Counter()
    for s in sets.values():
        disk.update(s.disk_sizes)
    print("on disk: " + ", ".join(f"{k} ({v})" for k, v in disk.most_common()))
    first = next(iter(sets.values()))
    n = sum(len(s) for s in sets.values())
    print(f"conditional: {first.conditional}  num_z: {first.num_z}")
    print(f"loaded {n} slices at {size}x{size} in {seconds:.2f} s ({n / max(seconds, 1e-9):.0f} slices/s); "
          f"batch indexing from tensors(): {_batch_rate(first):.0f} slices/s ({torch.get_num_threads()} torch threads)")
    notes = list(dict.fromkeys(n for s in sets.values() for n in s.notes))
    for note in notes[:12]:
        print(f"note: {note}")
    if len(notes) > 12:
        print(f"note: ... and {len(notes) - 12} more")


def _print_labels(sets):
    """Per split with tissue maps: how many slices, and the fraction of pixels in each class."""
    for split, s in sets.items():
        if s.labels is None:
            continue
        share = np.bincount(s.labels.ravel(), minlength=len(LABELS)) / s.labels.size
        print(f"labels {split}: {len(s.labels)} seg maps aligned with the slices; "
              + ", ".join(f"{name} {100 * f:.1f}%" for name, f in zip(LABELS, share)))


def cmd_inspect(args):
    """Print what a data folder holds and how fast it loads; exit 1 when a split has a problem."""
    kind, root = detect_layout(args.path)
    print(f"layout: {kind}  (root: {root})")
    index, folders, seg = _scan(kind, root, args.seed)
    print("seg maps: " + (", ".join(f"{s} {n}" for s, n in seg.items()) if seg else "none"))
    ok, problems = [], []
    for split in SPLITS:
        try:
            _require_split(index[split], split, folders[split])
            ok.append(split)
        except DataError as err:
            problems.append(str(err))
    if ok:
        start = time.perf_counter()
        sets = load_splits(root, args.size, ok, args.num_slices, args.seed, labels=True)
        _print_sets(sets, time.perf_counter() - start, args.size)
        _print_labels(sets)
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more problems above)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return 0


def cmd_build_demo(args):
    """Build the embedded pseudo-cohort and print its stats."""
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1 (or left out: up to 4 for big builds)")
    stats = build_demo(args.out, args.size, args.subjects, args.seed, args.workers)
    per = stats["subjects_per_split"]
    print(f"wrote {stats['subjects']} subjects x 32 slices at {args.size}x{args.size} to {args.out} "
          f"(train {per['train']}, validate {per['validate']}, test {per['test']}) in {stats['seconds']:.1f} s")
    return 0


def main(argv=None):
    """Parse the command line and run a sub-command."""
    parser = ArgumentParser(description="Brain MRI slices: inspect a data folder or build the embedded set.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show the layout, splits, sizes, notes and load speed of a data folder")
    p.add_argument("path")
    p.add_argument("--size", type=int, default=64, choices=SIZES)
    p.add_argument("--num-slices", type=int, default=32, help="axial slices per NIfTI volume")
    p.add_argument("--seed", type=seed_arg, default=0, help="subject split seed (NIfTI and plain folders)")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("build-demo", help="build the pseudo-cohort from the MNI template in the OASIS layout")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256, choices=SIZES)
    p.add_argument("--subjects", type=int, default=DEMO_SUBJECTS)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: up to 4 for big builds)")
    p.set_defaults(func=cmd_build_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    run_cli(main)
