"""Tests for dataset.py: every source, the embedded dataset, value conversion and every bad input.

Run: python -m pytest -q tests/test_dataset.py   (about a minute on 2 CPU cores)
"""
import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import dataset
from dataset import DataError, SliceDataset, detect_layout, load_split, load_splits, to_float
from util import UserError


# ----------------------------------------------------------------------------------------------
# Fixtures: tiny trees written into tmp_path


def png(path, arr):
    """Write a uint8/uint16 array as PNG (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def value(subject, z):
    """The constant grey level of the fixture slice (subject, z): lets a test check the mapping."""
    return 10 * z + int(subject)


def make_oasis(root, layout=None, num_z=4, side=32, seg=True):
    """A small OASIS tree: constant images whose grey level encodes (subject, z)."""
    layout = layout or {"train": ["001", "002"], "validate": ["003"], "test": ["004"]}
    for split, subjects in layout.items():
        for s in subjects:
            for z in range(num_z):
                png(root / f"keras_png_slices_{split}" / f"case_{s}_slice_{z}.nii.png",
                    np.full((side, side), value(s, z), np.uint8))
                if seg:
                    png(root / f"keras_png_slices_seg_{split}" / f"seg_{s}_slice_{z}.nii.png",
                        np.full((side, side), 85, np.uint8))
    return root


def run_cli(cli, *args):
    """Run dataset.py as a user would (through the `cli` fixture); returns the CompletedProcess."""
    return cli.run("dataset.py", *args, timeout=120)


# ----------------------------------------------------------------------------------------------
# OASIS layout


def test_oasis_parses_subject_and_z(tmp_path):
    make_oasis(tmp_path)
    kind, root = detect_layout(tmp_path)
    assert (kind, root) == ("oasis", tmp_path)
    s = load_split(tmp_path, "train", size=32)
    assert s.source == "oasis" and s.split == "train" and s.size == 32
    assert s.images.dtype == np.uint8 and s.images.shape == (8, 32, 32)
    assert s.z.dtype == np.int64 and sorted(s.z.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert set(s.subjects.tolist()) == {"001", "002"}
    assert s.num_z == 4 and s.conditional
    for img, subject, z, path in zip(s.images, s.subjects, s.z, s.paths):
        assert (img == value(subject, z)).all(), path  # the slice really came from case_<subject>_slice_<z>
        assert f"case_{subject}_slice_{z}.nii.png" in path


@pytest.mark.parametrize("depth", [1, 2])
def test_nested_archive_layout_is_found(tmp_path, depth):
    inner = tmp_path.joinpath(*["keras_png_slices_data"] * depth)
    make_oasis(inner)
    assert detect_layout(tmp_path) == ("oasis", inner)
    assert len(load_split(tmp_path, "test", size=32)) == 4


def test_pointing_at_a_split_folder_uses_the_tree(tmp_path):
    make_oasis(tmp_path)
    assert detect_layout(tmp_path / "keras_png_slices_train") == ("oasis", tmp_path)


def test_oasis_splits_are_by_subject_and_loaded_together(tmp_path):
    make_oasis(tmp_path)
    sets = load_splits(tmp_path, size=32)
    subjects = {k: set(v.subjects.tolist()) for k, v in sets.items()}
    assert subjects == {"train": {"001", "002"}, "validate": {"003"}, "test": {"004"}}
    assert all(v.num_z == 4 for v in sets.values())


def test_oasis_subject_in_two_splits_is_an_error(tmp_path):
    make_oasis(tmp_path, {"train": ["001", "002"], "validate": ["002"], "test": ["004"]})
    with pytest.raises(DataError, match="subject 002 is in both keras_png_slices_train.*keras_png_slices_validate"):
        load_split(tmp_path, "test", size=32)


def test_duplicate_subject_slice_names_both_files(tmp_path):
    make_oasis(tmp_path)
    png(tmp_path / "keras_png_slices_train" / "case_001_slice_0.png", np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match=r"case_001_slice_0\.nii\.png and case_001_slice_0\.png|"
                                        r"case_001_slice_0\.png and case_001_slice_0\.nii\.png"):
        load_split(tmp_path, "train", size=32)


def test_split_with_no_images_names_the_folder(tmp_path):
    make_oasis(tmp_path, {"train": ["001"], "test": ["004"]})
    (tmp_path / "keras_png_slices_validate").mkdir()
    with pytest.raises(DataError, match=r"keras_png_slices_validate: the validate split has no images"):
        load_split(tmp_path, "validate", size=32)
    (tmp_path / "keras_png_slices_validate").rmdir()
    with pytest.raises(DataError, match=r"keras_png_slices_validate: the validate split folder is missing"):
        load_split(tmp_path, "validate", size=32)


def test_junk_files_are_skipped_silently(tmp_path):
    make_oasis(tmp_path)
    folder = tmp_path / "keras_png_slices_train"
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / "Thumbs.db").write_bytes(b"junk")
    (folder / "._case_001_slice_0.nii.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "__MACOSX" / "._x.png").write_bytes(b"junk")
    s = load_split(tmp_path, "train", size=32)
    assert len(s) == 8
    assert not any("skipped" in n or "DS_Store" in n for n in s.notes)


def test_unmatched_names_are_skipped_with_a_note(tmp_path):
    make_oasis(tmp_path)
    png(tmp_path / "keras_png_slices_train" / "preview.png", np.zeros((32, 32), np.uint8))
    s = load_split(tmp_path, "train", size=32)
    assert len(s) == 8 and any("skipped 1 files" in n and "preview.png" in n for n in s.notes)


@pytest.mark.parametrize("content", [b"not a png at all", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, content):
    make_oasis(tmp_path)
    bad = tmp_path / "keras_png_slices_train" / "case_002_slice_3.nii.png"
    if content == "truncated":
        noise = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
        png(bad, noise)
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)
    with pytest.raises(DataError, match=r"case_002_slice_3\.nii\.png: unreadable or corrupt image"):
        load_split(tmp_path, "train", size=32)


def test_mixed_sizes_are_resized_and_noted(tmp_path):
    make_oasis(tmp_path)
    png(tmp_path / "keras_png_slices_train" / "case_001_slice_1.nii.png", np.full((64, 64), value("001", 1), np.uint8))
    png(tmp_path / "keras_png_slices_train" / "case_002_slice_2.nii.png", np.full((40, 30), value("002", 2), np.uint8))
    s = load_split(tmp_path, "train", size=32)
    assert s.images.shape == (8, 32, 32)
    assert any("mixed slice sizes" in n and "64x64" in n and "40x30" in n for n in s.notes)
    assert s.disk_sizes == {"32x32": 6, "64x64": 1, "40x30": 1}
    i = [k for k, (subj, z) in enumerate(zip(s.subjects, s.z)) if (subj, z) == ("001", 1)][0]
    assert (s.images[i] == value("001", 1)).all()
    j = [k for k, (subj, z) in enumerate(zip(s.subjects, s.z)) if (subj, z) == ("002", 2)][0]
    assert s.images[j][16, 0] == 0 and s.images[j][16, 16] == value("002", 2)  # zero-padded sides, then resized


def test_downsizing_is_an_area_average(tmp_path):
    make_oasis(tmp_path, num_z=1)
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 200).astype(np.uint8)
    png(tmp_path / "keras_png_slices_train" / "case_001_slice_0.nii.png", checker)
    s = load_split(tmp_path, "train", size=32)
    # A 1-pixel checkerboard must average to flat grey; point sampling would alias to 0 or 200.
    assert np.abs(s.images[0].astype(int) - 100).max() <= 1


def test_16bit_and_rgb_are_converted_and_noted(tmp_path):
    make_oasis(tmp_path)
    ramp = np.linspace(0, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)
    png(tmp_path / "keras_png_slices_train" / "case_001_slice_0.nii.png", ramp)
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 1] = 200
    png(tmp_path / "keras_png_slices_train" / "case_001_slice_1.nii.png", rgb)
    s = load_split(tmp_path, "train", size=32)
    by_key = {(subj, int(z)): img for subj, z, img in zip(s.subjects, s.z, s.images)}
    converted = by_key[("001", 0)]
    assert converted.max() == 255 and converted.min() == 0  # scaled by its own max (4000), not clipped at 255
    assert abs(int(converted[16, 0]) - round(int(ramp[16, 0]) * 255 / 4000)) <= 1
    assert abs(int(by_key[("001", 1)][0, 0]) - round(200 * 0.587)) <= 1  # green -> luma
    assert any("16-bit" in n and "own maximum" in n for n in s.notes)
    assert any("RGB" in n and "grayscale" in n for n in s.notes)


def test_bad_size_is_refused(tmp_path):
    make_oasis(tmp_path)
    with pytest.raises(UserError, match="--size 48"):
        load_split(tmp_path, "train", size=48)


# ----------------------------------------------------------------------------------------------
# NIfTI / Analyze volumes


def brain_volume(shape=(24, 28, 40), z_range=(8, 31), outlier=True):
    """Synthetic RAS volume: an ellipsoid 'brain' in z_range whose grey level rises with z, a bright
    anterior marker, and one huge outlier voxel that robust normalisation must ignore."""
    x, y, z = np.indices(shape, dtype=np.float32)
    cx, cy = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    inside = ((x - cx) / (shape[0] / 2.5)) ** 2 + ((y - cy) / (shape[1] / 2.5)) ** 2 <= 1
    inside &= (z >= z_range[0]) & (z <= z_range[1])
    vol = np.where(inside, 100 + 5 * z, 0).astype(np.float32)
    vol[int(cx) - 1:int(cx) + 2, shape[1] - 6:shape[1] - 4, z_range[0]:z_range[1] + 1] = 270  # anterior (high y)
    if outlier:
        vol[int(cx), int(cy), z_range[0]] = 1e6
    return vol


def write_volume(path, vol, affine=None, kind=nib.Nifti1Image):
    """Save a volume with nibabel (NIfTI or Analyze, chosen by kind and file name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(kind(vol, np.eye(4) if affine is None else affine), str(path))
    return path


def test_nifti_volumes_slices_ranks_and_normalisation(tmp_path):
    vol = brain_volume()
    write_volume(tmp_path / "sub01.nii.gz", vol)
    write_volume(tmp_path / "sub02.nii", vol * 3)
    write_volume(tmp_path / "sub03.img", vol, kind=nib.AnalyzeImage)
    assert (tmp_path / "sub03.hdr").exists()
    # The same brain stored left-right and anterior-posterior flipped (LPS): canonical RAS undoes it.
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [vol.shape[0] - 1, vol.shape[1] - 1, 0]
    write_volume(tmp_path / "nested" / "sub04.nii.gz", vol[::-1, ::-1].copy(), affine=lps)
    assert detect_layout(tmp_path) == ("nifti", tmp_path)
    sets = load_splits(tmp_path, size=32, num_slices=8, seed=0)
    subjects = [set(s.subjects.tolist()) for s in sets.values()]
    assert all(subjects) and set.union(*subjects) == {"sub01", "sub02", "sub03", "nested/sub04"}
    assert sum(len(s) for s in subjects) == 4  # each subject in exactly one split
    slices = {}
    for s in sets.values():
        assert s.source == "nifti" and s.num_z == 8 and s.conditional and s.images.dtype == np.uint8
        for subject in set(s.subjects.tolist()):
            rows = s.subjects == subject
            assert s.z[rows].tolist() == list(range(8))
            slices[subject] = s.images[rows]
    for subject, imgs in slices.items():
        means = [img[img > 0].mean() for img in imgs]
        assert all(b > a for a, b in zip(means, means[1:])), subject  # z ranks follow the axial order
        assert (imgs[:, 0, :] == 0).all() and imgs.max() == 255  # black background, full range used
        # The 1e6 outlier is clipped by the 99.5th percentile instead of squashing the brain to black.
        assert np.median(imgs[imgs > 0]) > 60
        # The bright anterior marker (high y) lands in the top rows: rows run anterior -> posterior.
        rows = np.nonzero(imgs == 255)[1]
        assert len(rows) and rows.max() < 10, subject
    assert np.array_equal(slices["sub01"], slices["nested/sub04"])
    assert np.abs(slices["sub01"].astype(int) - slices["sub02"]).max() <= 1  # per-volume normalisation undoes x3
    # Analyze has no orientation field: nibabel reads it as radiological (x flipped), hence the mirror.
    mirrored = slices["sub03"][..., ::-1]
    assert np.array_equal(slices["sub01"], slices["sub03"]) or np.array_equal(slices["sub01"], mirrored)


def test_nifti_split_is_deterministic_and_seeded(tmp_path):
    vol = brain_volume(outlier=False)
    for i in range(10):
        write_volume(tmp_path / f"s{i:02d}.nii", vol)
    a = dataset._nifti_index(tmp_path, seed=0)
    b = dataset._nifti_index(tmp_path, seed=0)
    c = dataset._nifti_index(tmp_path, seed=1)
    assert a == b and a != c
    assert [len(a[s]) for s in dataset.SPLITS] == [8, 1, 1]


def test_nifti_4d_uses_first_volume_and_5d_is_refused(tmp_path):
    vol = brain_volume(outlier=False)
    write_volume(tmp_path / "a.nii", vol)
    write_volume(tmp_path / "b.nii", vol)
    write_volume(tmp_path / "c.nii.gz", np.stack([vol, np.zeros_like(vol)], axis=-1))
    sets = load_splits(tmp_path, size=32, num_slices=4)
    notes = [n for s in sets.values() for n in s.notes]
    assert "c.nii.gz: 4-D volume: used the first volume" in notes
    c = next(s for s in sets.values() if "c" in s.subjects)
    assert c.images.max() == 255  # the first (non-zero) volume was used
    write_volume(tmp_path / "c.nii.gz", np.stack([np.stack([vol, vol], -1)] * 2, -1))
    with pytest.raises(DataError, match=r"c\.nii\.gz: expected a 3-D volume, found shape 24x28x40x2x2"):
        load_splits(tmp_path, size=32, num_slices=4)


def test_nifti_anisotropic_voxels_get_square_pixels(tmp_path):
    # 24 x 12 voxels of 1 x 2 mm: a 24 x 24 mm square in-plane, which must fill the whole image.
    vol = np.zeros((24, 12, 10), np.float32)
    vol[:, :, 2:8] = 50
    for name in ("a", "b", "c"):
        write_volume(tmp_path / f"{name}.nii", vol, affine=np.diag([1.0, 2.0, 1.0, 1.0]))
    sets = load_splits(tmp_path, size=32, num_slices=4)
    images = np.concatenate([s.images for s in sets.values()])
    assert (images > 0).mean() > 0.95  # without resampling it would be a 12 x 24 strip padded with black
    assert any("non-square in-plane voxels" in n for s in sets.values() for n in s.notes)


def test_nifti_bad_inputs(tmp_path):
    vol = brain_volume(outlier=False)
    write_volume(tmp_path / "a.nii", vol)
    write_volume(tmp_path / "b.nii", vol)
    with pytest.raises(DataError, match="the validate split has no volumes"):
        load_split(tmp_path, "validate", size=32)
    (tmp_path / "c.nii.gz").write_bytes(b"\x1f\x8b garbage that is not a volume")
    with pytest.raises(DataError, match=r"c\.nii\.gz: unreadable or corrupt volume"):
        load_splits(tmp_path, size=32, num_slices=4)
    (tmp_path / "c.nii.gz").unlink()
    write_volume(tmp_path / "a.nii.gz", vol)
    with pytest.raises(DataError, match=r"two volumes for subject a: a\.nii and a\.nii\.gz"):
        load_splits(tmp_path, size=32)
    (tmp_path / "a.nii.gz").unlink()
    (tmp_path / "d.img").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"d\.img: Analyze \.img volume without its \.hdr"):
        load_splits(tmp_path, size=32)
    (tmp_path / "d.img").unlink()
    write_volume(tmp_path / "e.nii", np.zeros((8, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"e\.nii: volume is all zero"):
        load_splits(tmp_path, size=32)


# ----------------------------------------------------------------------------------------------
# Plain folders of images


def test_plain_folder_is_unconditional_and_split_by_file(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        png(tmp_path / "pics" / f"img{i}.png", rng.integers(0, 255, (20, 20), dtype=np.uint8))
    for i in range(2):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    (tmp_path / "readme.txt").write_text("hello")
    assert detect_layout(tmp_path) == ("folder", tmp_path)
    sets = load_splits(tmp_path, size=32, seed=0)
    assert [len(sets[s]) for s in dataset.SPLITS] == [10, 1, 1]
    names = [set(s.subjects.tolist()) for s in sets.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    for s in sets.values():
        assert not s.conditional and s.num_z == 0 and (s.z == -1).all() and s.source == "folder"
    train = sets["train"]
    assert any("skipped 1 files that are not images" in n for n in train.notes)
    other = load_splits(tmp_path, size=32, seed=1)
    assert [set(s.subjects.tolist()) for s in other.values()] != names


def test_plain_folder_with_split_subfolders(tmp_path):
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for i in range(n):
            png(tmp_path / split / f"{i}.png", np.full((32, 32), 7, np.uint8))
    sets = load_splits(tmp_path, size=32)
    assert {k: len(v) for k, v in sets.items()} == {"train": 3, "validate": 2, "test": 1}
    assert sets["validate"].subjects.tolist() == ["val/0.png", "val/1.png"]
    (tmp_path / "test" / "0.png").unlink()
    with pytest.raises(DataError, match=r"test: the test split has no images"):
        load_split(tmp_path, "test", size=32)


# ----------------------------------------------------------------------------------------------
# Values, tensors and the torch Dataset


def test_to_float_and_dataset_items(tmp_path):
    x = torch.tensor([0, 255, 51], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))
    assert to_float(x).dtype == torch.float32
    make_oasis(tmp_path)
    s = load_split(tmp_path, "train", size=32)
    images, z = s.tensors()
    assert images.shape == (8, 1, 32, 32) and images.dtype == torch.uint8 and z.dtype == torch.long
    assert images.data_ptr() == torch.from_numpy(s.images).data_ptr()  # no copy of the cached slices
    ds = SliceDataset(s)
    img, zi = ds[3]
    assert len(ds) == 8 and img.shape == (1, 32, 32) and img.dtype == torch.float32
    assert isinstance(zi, int) and zi == s.z[3]
    assert torch.allclose(img, torch.full((1, 32, 32), value(s.subjects[3], s.z[3]) / 127.5 - 1))


def test_split_fractions():
    for n, expected in ((3, [1, 1, 1]), (4, [2, 1, 1]), (10, [8, 1, 1]), (30, [24, 3, 3]), (2, [2, 0, 0])):
        assignment = dataset.split_subjects([f"s{i}" for i in range(n)], seed=0)
        assert [list(assignment.values()).count(s) for s in dataset.SPLITS] == expected, n


# ----------------------------------------------------------------------------------------------
# Bad input in general


def test_missing_empty_and_unrecognisable_folders(tmp_path):
    with pytest.raises(DataError, match=r"nope: no such file or folder"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"empty: folder is empty"):
        load_split(tmp_path / "empty", "train")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"odd: nothing recognisable"):
        detect_layout(tmp_path / "odd")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"file\.png: not a folder"):
        detect_layout(tmp_path / "file.png")


def test_cli_bad_input_is_one_error_line(tmp_path, cli):
    result = run_cli(cli, "inspect", tmp_path / "missing")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such file or folder"]
    make_oasis(tmp_path / "data")
    (tmp_path / "data" / "keras_png_slices_test" / "case_004_slice_2.nii.png").write_bytes(b"broken")
    result = run_cli(cli, "inspect", tmp_path / "data", "--size", "32")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "case_004_slice_2.nii.png: unreadable" in lines[0]


def test_cli_inspect_reports_the_tree(tmp_path, cli):
    make_oasis(tmp_path / "a" / "keras_png_slices_data")
    result = run_cli(cli, "inspect", tmp_path / "a", "--size", "32")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layout: oasis" in out and str(tmp_path / "a" / "keras_png_slices_data") in out
    assert "seg maps: train 8, validate 4, test 4" in out
    assert "train           8         2  0..3" in out and "on disk: 32x32 (16)" in out
    assert "slices/s" in out


# ----------------------------------------------------------------------------------------------
# The embedded MNI dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two builds with seed 0 and one with seed 1, 3 subjects at 32x32."""
    base = tmp_path_factory.mktemp("demo")
    stats = [dataset.build_demo(base / name, size=32, subjects=3, seed=seed, progress=False)
             for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    return base, stats


def _png_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_demo_is_deterministic_and_varies(demo):
    base, stats = demo
    a, b, c = (_png_bytes(base / n) for n in "abc")
    assert len(a) == 3 * 32 * 2 and a == b  # byte-identical for the same seed
    by_name = {k.split("/")[-1]: v for k, v in a.items()}
    other = {k.split("/")[-1]: v for k, v in c.items()}
    assert by_name.keys() == other.keys()
    assert sum(by_name[k] != other[k] for k in by_name if k.startswith("case_")) > 0.9 * 3 * 32  # another seed
    assert stats[0]["seconds"] > 0 and stats[0]["subjects_per_split"] == {"train": 1, "validate": 1, "test": 1}
    sets = load_splits(base / "a", size=32)
    one, two = sets["train"].images, sets["validate"].images
    assert np.abs(one.astype(int) - two.astype(int)).mean() > 3  # subjects differ


def test_demo_round_trips_through_the_oasis_loader(demo):
    base, _ = demo
    assert detect_layout(base / "a") == ("oasis", base / "a")
    sets = load_splits(base / "a", size=32)
    for s in sets.values():
        assert len(s) == 32 and s.z.tolist() == list(range(32)) and s.num_z == 32
        assert s.images.dtype == np.uint8 and s.images.min() == 0 and s.images.max() >= 200
        mid = s.images[16]
        rows, cols = np.nonzero(mid)
        assert np.ptp(rows) > 0.6 * 32 and np.ptp(cols) > 0.5 * 32  # the brain fills most of the square
        assert mid[0].max() == 0 and mid[:, 0].max() == 0  # black background at the border
    segs = sorted((base / "a" / "keras_png_slices_seg_train").glob("seg_*_slice_16.nii.png"))
    seg = np.asarray(Image.open(segs[0]))
    img = sets["train"].images[16]
    assert set(np.unique(seg)) == {0, 85, 170, 255}
    assert ((seg > 0) != (img > 0)).mean() < 0.05  # labels cover the brain in the image


def test_demo_workers_give_the_same_bytes(demo, tmp_path):
    base, _ = demo
    dataset.build_demo(tmp_path / "w2", size=32, subjects=3, seed=0, workers=2, progress=False)
    assert _png_bytes(tmp_path / "w2") == _png_bytes(base / "a")


def test_demo_refuses_to_overwrite(demo):
    base, _ = demo
    with pytest.raises(UserError, match="already holds keras_png_slices"):
        dataset.build_demo(base / "a", size=32, subjects=3)


def test_ensure_dataset_builds_once(tmp_path, monkeypatch, capsys):
    target = tmp_path / "data" / "embedded_32"
    monkeypatch.setattr(dataset, "default_data_dir", lambda size: target)
    monkeypatch.setattr(dataset, "DEMO_SUBJECTS", 10)  # the real default (64) is timed in the report, not here
    assert dataset.ensure_dataset(None, 32) == target
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no --data given: building the embedded MNI dataset at" in out
    assert "(once)" in out
    assert len(list((target / "keras_png_slices_train").glob("*.png"))) == 8 * 32
    stamp = (target / "embedded.json").stat().st_mtime_ns
    assert dataset.ensure_dataset(None, 32) == target
    assert capsys.readouterr().out == "" and (target / "embedded.json").stat().st_mtime_ns == stamp
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary build left
    assert dataset.ensure_dataset(tmp_path, 32) == tmp_path
    with pytest.raises(DataError, match="no such file or folder"):
        dataset.ensure_dataset(tmp_path / "nope", 32)


def test_default_data_dir_is_beside_the_code(repo_root):
    assert dataset.default_data_dir(64) == repo_root / "data" / "embedded_64"
