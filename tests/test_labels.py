"""Tissue labels in the data API: OASIS seg PNGs (and the embedded set's) loaded as classes 0..3 aligned with
each slice, resized by nearest neighbour, and every broken seg input as one DataError naming the file.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_labels.py
"""
import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import DataError

LEVELS = np.array([0, 85, 170, 255], dtype=np.uint8)


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _seg_map(subject, z, side):
    """A random seg map seeded by (subject, z): every class appears, and each slice's map is its own."""
    rng = np.random.default_rng(1000 * int(subject) + z)
    return LEVELS[rng.integers(0, 4, (side, side))]


def make_tree(root, side=32, num_z=3, layout=None):
    layout = layout or {"train": ["001", "002"], "validate": ["003"], "test": ["004"]}
    for split, subjects in layout.items():
        for s in subjects:
            for z in range(num_z):
                _png(root / f"keras_png_slices_{split}" / f"case_{s}_slice_{z}.nii.png",
                     np.full((side, side), 10 * z + int(s), np.uint8))
                _png(root / f"keras_png_slices_seg_{split}" / f"seg_{s}_slice_{z}.nii.png", _seg_map(s, z, side))
    return root


def test_labels_are_classes_aligned_with_their_slices(tmp_path):
    root = make_tree(tmp_path / "d")
    sets = dataset.load_splits(root, size=32, labels=True)
    for split, s in sets.items():
        assert s.labels.shape == s.images.shape and s.labels.dtype == np.uint8
        for i in range(len(s)):
            subject, z = s.subjects[i], int(s.z[i])
            assert s.images[i, 0, 0] == 10 * z + int(subject)  # the slice ...
            expected = np.searchsorted(LEVELS, _seg_map(subject, z, 32))  # ... and its own map, as 0..3
            assert np.array_equal(s.labels[i], expected), (split, subject, z)
    assert dataset.load_splits(root, size=32)["train"].labels is None  # only loaded when asked for


def test_labels_are_resized_by_nearest_neighbour(tmp_path):
    root = make_tree(tmp_path / "d", side=128, num_z=1)
    s = dataset.load_split(root, "train", size=32, labels=True)
    full = np.searchsorted(LEVELS, _seg_map(s.subjects[0], 0, 128))
    # PIL's nearest resampling 128 -> 32 takes the pixel at the centre of each 4x4 block, (2, 2) of it
    assert np.array_equal(s.labels[0], full[2::4, 2::4])
    assert set(np.unique(s.labels)) <= {0, 1, 2, 3}  # never an averaged, in-between class


def test_split_without_seg_folder_has_no_labels(tmp_path):
    root = make_tree(tmp_path / "d")
    for f in (root / "keras_png_slices_seg_test").iterdir():
        f.unlink()
    (root / "keras_png_slices_seg_test").rmdir()
    sets = dataset.load_splits(root, size=32, labels=True)
    assert sets["test"].labels is None and sets["train"].labels is not None


def test_bad_seg_maps_name_the_file(tmp_path):
    root = make_tree(tmp_path / "d")
    seg = root / "keras_png_slices_seg_train"
    orphan = seg / "seg_009_slice_0.nii.png"
    _png(orphan, np.zeros((32, 32), np.uint8))
    with pytest.raises(DataError, match=r"seg_009_slice_0.nii.png: seg map without its image \(no "
                                        r"case_009_slice_0.nii.png in keras_png_slices_train"):
        dataset.load_splits(root, size=32, labels=True)
    orphan.unlink()
    missing = seg / "seg_002_slice_1.nii.png"
    kept = missing.read_bytes()
    missing.unlink()
    with pytest.raises(DataError, match=r"keras_png_slices_seg_train: no seg map for case_002_slice_1.nii.png "
                                        r"\(expected seg_002_slice_1.nii.png; 1 of 6 slices have none\)"):
        dataset.load_splits(root, size=32, labels=True)
    missing.write_bytes(kept)
    target = seg / "seg_001_slice_2.nii.png"
    _png(target, LEVELS[np.zeros((16, 32), int)])
    with pytest.raises(DataError, match=r"seg_001_slice_2.nii.png: seg map is 16x32 but its image "
                                        r"case_001_slice_2.nii.png is 32x32"):
        dataset.load_splits(root, size=32, labels=True)
    _png(target, np.full((32, 32), 100, np.uint8))
    with pytest.raises(DataError, match=r"seg_001_slice_2.nii.png: holds levels 100; an OASIS seg map has only "
                                        r"0, 85, 170, 255"):
        dataset.load_splits(root, size=32, labels=True)
    target.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"seg_001_slice_2.nii.png: unreadable or corrupt seg map"):
        dataset.load_splits(root, size=32, labels=True)
    assert dataset.load_splits(root, size=32)["train"].labels is None  # images alone still load


def test_embedded_set_labels_cover_the_brain(tiny_data):
    s = dataset.load_split(tiny_data, "train", size=32, labels=True)
    brain = s.labels > 0
    assert 0.1 < brain.mean() < 0.6 and set(np.unique(s.labels)) == {0, 1, 2, 3}
    inside, outside = s.images[brain].mean(), s.images[~brain].mean()
    assert inside > 4 * outside  # the maps lie on the bright brain, not shifted off it
    white, grey = s.images[s.labels == 3].mean(), s.images[s.labels == 2].mean()
    assert white > grey  # T1: white matter brighter than grey


def test_inspect_reports_labels_and_bad_seg_is_one_line(tmp_path, cli):
    root = make_tree(tmp_path / "d")
    result = cli.run("dataset.py", "inspect", root, "--size", 32, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "labels train: 6 seg maps aligned with the slices; background" in result.stdout
    _png(root / "keras_png_slices_seg_validate" / "seg_003_slice_0.nii.png", np.full((32, 32), 7, np.uint8))
    cli.assert_one_line_error(cli.run("dataset.py", "inspect", root, "--size", 32, timeout=120),
                              "seg_003_slice_0.nii.png: holds levels 7")


# ----------------------------------------------------------------------------------------------
# NIfTI: NAME_seg.nii.gz beside NAME.nii.gz


def _nifti_subject(folder, name, label_fn, levels=None, label_shape=None):
    """A 32x32x40 volume: a constant ellipsoid brain over z 8..31, and its label volume label_fn(x, y, z) inside
    the brain (0 outside), optionally written as the OASIS levels."""
    import nibabel as nib

    x, y, z = np.indices((32, 32, 40))
    inside = (((x - 15.5) / 13) ** 2 + ((y - 15.5) / 13) ** 2 <= 1) & (z >= 8) & (z <= 31)
    image = np.where(inside, 200.0, 0.0).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"{name}.nii.gz"))
    label = np.where(inside, label_fn(x, y, z), 0).astype(np.uint8)
    if levels is not None:
        label = levels[label]
    if label_shape is not None:
        label = label[: label_shape[0], : label_shape[1], : label_shape[2]]
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / f"{name}_seg.nii.gz"))
    return inside


def test_nifti_label_volumes_are_sliced_where_the_image_is(tmp_path):
    folder = tmp_path / "nifti"
    folder.mkdir()
    def by_side_and_height(x, y, z):
        return 1 + (x >= 16) + (z >= 20)
    for i in range(3):
        inside = _nifti_subject(folder, f"sub{i}", by_side_and_height, levels=LEVELS if i == 1 else None)
    sets = dataset.load_splits(folder, size=32, num_slices=8, labels=True)
    picks = np.floor(8 + (np.arange(8) + 0.5) * 24 / 8).astype(int)  # centres of 8 bins over z 8..31
    rows, cols = np.indices((32, 32))
    for s in sets.values():
        assert s.labels.shape == (8, 32, 32)
        for k, zk in enumerate(picks):
            brain = inside[cols, 31 - rows, zk]  # rows run anterior -> posterior (y flipped), columns = x
            expected = np.where(brain, 1 + (cols >= 16) + (zk >= 20), 0)
            assert np.array_equal(s.labels[k], expected), k
            assert np.array_equal(s.images[k] > 0, brain)  # the image's brain is the labelled one
    assert all(s.labels is None for s in dataset.load_splits(folder, size=32, num_slices=8).values())
    assert len(dataset.load_splits(folder, size=32, num_slices=8)["train"].subjects) == 8  # labels are not subjects


def test_nifti_label_rows_run_anterior_to_posterior(tmp_path):
    folder = tmp_path / "nifti"
    folder.mkdir()
    for i in range(3):
        _nifti_subject(folder, f"sub{i}", lambda x, y, z: 1 + (y >= 16))
    s = dataset.load_split(folder, "train", size=32, num_slices=8, labels=True)
    mid = s.labels[4]
    assert (mid[:16][mid[:16] > 0] == 2).all() and (mid[16:][mid[16:] > 0] == 1).all()  # anterior (high y) on top


def test_bad_nifti_label_volumes_name_the_file(tmp_path):
    import nibabel as nib

    folder = tmp_path / "nifti"
    folder.mkdir()
    for i in range(3):
        _nifti_subject(folder, f"sub{i}", lambda x, y, z: 1 + (x >= 16))
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 40), np.uint8), np.eye(4)), str(folder / "ghost_seg.nii.gz"))
    with pytest.raises(DataError, match=r"ghost_seg.nii.gz: label volume without its image"):
        dataset.load_splits(folder, size=32, labels=True)
    (folder / "ghost_seg.nii.gz").unlink()
    (folder / "sub2_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=r"sub2.nii.gz: no label volume beside it \(expected sub2_seg.nii.gz; "
                                        r"1 of 3 volumes have none\)"):
        dataset.load_splits(folder, size=32, labels=True)
    assert dataset.load_splits(folder, size=32)["train"].labels is None  # images alone still load
    _nifti_subject(folder, "sub2", lambda x, y, z: 1 + (x >= 16), label_shape=(32, 32, 30))
    with pytest.raises(DataError, match=r"sub2_seg.nii.gz: label volume is not on the grid of its image sub2.nii.gz"):
        dataset.load_splits(folder, size=32, labels=True)
    _nifti_subject(folder, "sub2", lambda x, y, z: 7)
    with pytest.raises(DataError, match=r"sub2_seg.nii.gz: holds values 7; labels must be 0..3"):
        dataset.load_splits(folder, size=32, labels=True)


def test_inspect_counts_nifti_label_volumes(tmp_path, cli):
    folder = tmp_path / "nifti"
    folder.mkdir()
    for i in range(3):
        _nifti_subject(folder, f"sub{i}", lambda x, y, z: 1 + (x >= 16))
    result = cli.run("dataset.py", "inspect", folder, "--size", 32, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "seg maps: train 1, validate 1, test 1" in result.stdout
    assert "labels train: 32 seg maps aligned with the slices" in result.stdout


# ----------------------------------------------------------------------------------------------
# The segmenter and Dice (evaluation.py)


def test_dice_scores_match_a_direct_count():
    import evaluation

    rng = np.random.default_rng(0)
    pred, target = rng.integers(0, 4, (5, 16, 16)), rng.integers(0, 4, (5, 16, 16))
    got = evaluation.dice_scores(pred, target)
    for c, name in ((1, "CSF"), (2, "grey matter"), (3, "white matter")):
        p, t = pred == c, target == c
        assert got[f"dice/{name}"] == pytest.approx(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))
    tissues = ("CSF", "grey matter", "white matter")
    assert got["dice_mean"] == pytest.approx(np.mean([got[f"dice/{n}"] for n in tissues]))
    assert evaluation.dice_scores(target, target)["dice_mean"] == 1.0
    assert evaluation.dice_scores(np.zeros((2, 4, 4)), np.ones((2, 4, 4)))["dice/CSF"] == 0.0
    assert evaluation.dice_scores(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))["dice_mean"] == 1.0  # nothing to find


def test_segmenter_learns_tissue_from_real_pairs(tiny_data):
    import torch

    import evaluation

    train = dataset.load_split(tiny_data, "train", size=32, labels=True)
    test = dataset.load_split(tiny_data, "test", size=32, labels=True)
    images, _ = train.tensors()
    model = evaluation.train_segmenter(images, torch.from_numpy(train.labels), steps=150, seed=0)
    scores = evaluation.dice_scores(evaluation.segment(model, test.tensors()[0]), test.labels)
    untrained = evaluation.dice_scores(np.zeros_like(test.labels), test.labels)
    assert scores["dice_mean"] > 0.5 and untrained["dice_mean"] == 0.0, scores
    with pytest.raises(ValueError, match="need matching images and labels"):
        evaluation.train_segmenter(images[:3], torch.from_numpy(train.labels[:2]), steps=1)


def test_segmentation_reference_reports_both_real_sides(tiny_data, tmp_path):
    import evaluation
    from util import UserError

    m = evaluation.segmentation_reference(tiny_data, 32, steps=20)
    assert m["segmenter_train_pairs"] == 128 and m["segmenter_test_slices"] == 32 and m["segmenter_steps"] == 20
    for side in ("real", "real_2_subjects"):
        for key in ("dice/CSF", "dice/grey matter", "dice/white matter", "dice_mean"):
            assert 0 <= m[f"segmenter_{side}/{key}"] <= 1
    plain = tmp_path / "plain"
    for split in ("train", "validate", "test"):
        for i in range(2):
            _png(plain / split / f"{i}.png", np.full((32, 32), 50, np.uint8))
    with pytest.raises(UserError, match="has no tissue maps for the train and test splits"):
        evaluation.segmentation_reference(plain, 32, steps=1)


def test_segmenter_flag_is_checked(cli):
    cli.assert_one_line_error(cli.run("evaluation.py", "--segmenter", "-1", timeout=120),
                              "--segmenter -1: steps must be 0 (skip) or more")
