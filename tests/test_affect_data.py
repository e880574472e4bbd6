"""Aff-Wild2 annotation readers (fastsam.affect.data) on small trees built in tmp_path."""
import numpy as np
import pytest

from fastsam.affect.data import SPLITS, Frame, labels_array, read_annotation, scan_split, split_folder
from fastsam.affect.tasks import AU, EXPR

EXPR_HEADER = ",".join(EXPR.names)
AU_HEADER = ",".join(AU.names)


def _write(path, header, rows, newline="\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(newline.join([header, *rows]).encode() + newline.encode())
    return path


def _images(root, video, frames):
    # scan_split only checks existence, so empty files stand in for JPEGs.
    folder = root / video
    folder.mkdir(parents=True, exist_ok=True)
    for i in frames:
        (folder / f"{i:05d}.jpg").write_bytes(b"")


def _au_row(first, rest=0):
    return ",".join([str(first)] + [str(rest)] * 11)


def test_read_expr(tmp_path):
    p = _write(tmp_path / "v.txt", EXPR_HEADER, ["0", "7 ", "-1", "3"])
    got = read_annotation(p, EXPR)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 7, -1, 3])


def test_read_au_crlf_and_blank_tail(tmp_path):
    p = _write(tmp_path / "v.txt", AU_HEADER, [_au_row(1), _au_row(-1, -1), _au_row(0, 1), ""], newline="\r\n")
    got = read_annotation(p, AU)
    assert got.shape == (3, 12) and got.dtype == np.int64
    assert got[0, 0] == 1 and (got[0, 1:] == 0).all()
    assert (got[1] == -1).all()
    assert got[2, 0] == 0 and (got[2, 1:] == 1).all()


def test_header_only_gives_empty(tmp_path):
    assert read_annotation(_write(tmp_path / "v.txt", AU_HEADER, []), AU).shape == (0, 12)


def test_wrong_task_header(tmp_path):
    au_file = _write(tmp_path / "au.txt", AU_HEADER, [_au_row(0)])
    with pytest.raises(ValueError, match=r"au\.txt:1: header is the AU header, but task is expr"):
        read_annotation(au_file, EXPR)
    expr_file = _write(tmp_path / "expr.txt", EXPR_HEADER, ["1"])
    with pytest.raises(ValueError, match=r"expr\.txt:1: header is the EXPR header, but task is au"):
        read_annotation(expr_file, AU)
    other = _write(tmp_path / "other.txt", "Valence,Arousal", ["0.1,0.2"])
    with pytest.raises(ValueError, match="not a known header"):
        read_annotation(other, AU)


@pytest.mark.parametrize(
    "task,rows,match",
    [
        (EXPR, ["0", "8"], r"v\.txt:3: value 8 out of range"),
        (EXPR, ["-2"], r"v\.txt:2: value -2 out of range"),
        (EXPR, ["0", "1,2"], r"v\.txt:3: expected one class index"),
        (EXPR, ["x"], r"v\.txt:2: not an integer"),
        (EXPR, ["0", "", "1"], r"v\.txt:3: not an integer"),  # inner blank line would shift frames
        (AU, [_au_row(0), _au_row(2)], r"v\.txt:3: value 2 out of range"),
        (AU, ["0,1"], r"v\.txt:2: expected 12 comma-separated values, got 2"),
    ],
)
def test_bad_values_name_file_and_line(tmp_path, task, rows, match):
    header = AU_HEADER if task.multilabel else EXPR_HEADER
    with pytest.raises(ValueError, match=match):
        read_annotation(_write(tmp_path / "v.txt", header, rows), task)


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_annotation(tmp_path / "nope.txt", EXPR)
    with pytest.raises(TypeError, match="task"):
        read_annotation(_write(tmp_path / "v.txt", EXPR_HEADER, ["0"]), "expr")
    with pytest.raises(ValueError, match="empty file"):
        read_annotation(_write(tmp_path / "e.txt", "", []), EXPR)


def test_frame_image():
    assert Frame("12-24-1920x1080_left", 7, 3).image == "12-24-1920x1080_left/00007.jpg"


def test_scan_expr(tmp_path):
    images, ann = tmp_path / "cropped_aligned", tmp_path / "annotations"
    split = ann / SPLITS["train"]
    # b: 4 lines; line 2 invalid; image 3 absent -> frames 1, 4 kept.
    _write(split / "b.txt", EXPR_HEADER, ["1", "-1", "2", "5"])
    _images(images, "b", [1, 2, 4])
    # a_left / a_right: two subjects of one clip, separate folders, names kept whole.
    _write(split / "a_left.txt", EXPR_HEADER, ["0", "6"], newline="\r\n")
    _images(images, "a_left", [1, 2])
    _write(split / "a_right.txt", EXPR_HEADER, ["4"])
    _images(images, "a_right", [1])
    # c: no image folder at all -> its 2 valid frames are missing, the -1 is invalid.
    _write(split / "c.txt", EXPR_HEADER, ["3", "-1", "3"])
    (split / "notes.md").write_text("ignored")

    frames, stats = scan_split(images, ann, EXPR, "train")
    assert [f.image for f in frames] == [
        "a_left/00001.jpg", "a_left/00002.jpg", "a_right/00001.jpg", "b/00001.jpg", "b/00004.jpg",
    ]
    assert [f.label for f in frames] == [0, 6, 4, 1, 5]
    assert stats.as_dict() == {"videos": 4, "frames": 5, "invalid": 2, "missing": 3}
    np.testing.assert_array_equal(labels_array(frames, EXPR), [0, 6, 4, 1, 5])


def test_annotations_may_name_the_split_folder_itself(tmp_path):
    """--annotations as the task folder (parent of Train_Set/Validation_Set) or as the split folder: the same
    frames; the other split's folder is refused by name."""
    images, ann = tmp_path / "cropped_aligned", tmp_path / "annotations"
    for split, labels in (("train", ["1", "2"]), ("val", ["3"])):
        _write(ann / SPLITS[split] / "v.txt", EXPR_HEADER, labels)
    _images(images, "v", [1, 2])
    for split in ("train", "val"):
        folder = ann / SPLITS[split]
        assert split_folder(ann, split) == (str(folder), True)
        assert split_folder(folder, split) == (str(folder), False)
        assert scan_split(images, folder, EXPR, split) == scan_split(images, ann, EXPR, split)
    assert [f.label for f in scan_split(images, ann / "Train_Set", EXPR, "train")[0]] == [1, 2]
    with pytest.raises(ValueError, match="is the Validation_Set folder, but the split is train"):
        split_folder(ann / "Validation_Set", "train")
    with pytest.raises(ValueError, match="is the Train_Set folder, but the split is val"):
        scan_split(images, ann / "Train_Set", EXPR, "val")
    # a split folder of another name (a user's own copy) is taken as the split asked for
    other = tmp_path / "my_train"
    _write(other / "v.txt", EXPR_HEADER, ["1", "2"])
    assert split_folder(other, "train") == (str(other), False)


def test_scan_au_any_minus_one_is_invalid(tmp_path):
    images, ann = tmp_path / "img", tmp_path / "ann"
    split = ann / SPLITS["val"]
    partial = ",".join(["1", "-1"] + ["0"] * 10)
    _write(split / "v.txt", AU_HEADER, [_au_row(1), partial, _au_row(-1, -1), _au_row(0, 1), _au_row(1, 1)])
    _images(images, "v", [1, 2, 3, 4])  # frame 5's image is missing
    frames, stats = scan_split(images, ann, AU, "val")
    assert [f.frame for f in frames] == [1, 4]
    assert frames[0].label == (1,) + (0,) * 11
    assert stats.as_dict() == {"videos": 1, "frames": 2, "invalid": 2, "missing": 1}
    arr = labels_array(frames, AU)
    assert arr.shape == (2, 12) and arr.dtype == np.int64
    assert labels_array([], AU).shape == (0, 12)
    with pytest.raises(ValueError, match="not expr labels"):
        labels_array(frames, EXPR)


def test_scan_wrong_task_folder(tmp_path):
    _write(tmp_path / "ann" / "Train_Set" / "v.txt", AU_HEADER, [_au_row(0)])
    (tmp_path / "img").mkdir()
    with pytest.raises(ValueError, match="header is the AU header, but task is expr"):
        scan_split(tmp_path / "img", tmp_path / "ann", EXPR, "train")


def test_scan_errors(tmp_path):
    images, ann = tmp_path / "img", tmp_path / "ann"
    images.mkdir()
    ann.mkdir()
    with pytest.raises(ValueError, match="split must be one of"):
        scan_split(images, ann, EXPR, "test")
    with pytest.raises(FileNotFoundError, match="images_dir"):
        scan_split(tmp_path / "none", ann, EXPR, "train")
    with pytest.raises(FileNotFoundError, match="annotations_dir"):
        scan_split(images, tmp_path / "none", EXPR, "train")
    with pytest.raises(FileNotFoundError, match=r"Train_Set not found: --annotations must be the task's folder "
                                                 r"holding Train_Set and Validation_Set, or the Train_Set folder"):
        scan_split(images, ann, EXPR, "train")
    (ann / "Validation_Set").mkdir()
    with pytest.raises(ValueError, match="no .txt annotation files"):
        scan_split(images, ann, EXPR, "val")
