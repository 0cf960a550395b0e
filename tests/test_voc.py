"""The Pascal VOC reader (medrobust.data.voc) on real files: BCCD-like folders written by
medrobust.data.voc_examples (JPEGs, XMLs, ImageSets split lists), hand-written XMLs for the coordinate convention,
and each bad input, which must stop with an error naming the file."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medrobust.data.voc import BCCD_CLASSES, load_image, read_voc, standard_to_voc, voc_to_standard
from medrobust.data.voc_examples import CELLS, example_objects, example_splits, write_annotation, write_voc

SIZE = (96, 128)  # write_voc's default (rows, columns): not square, so swapped axes show
TRAIN_STEM = example_splits()["train"][0]
VAL_STEM = example_splits()["val"][0]


@pytest.fixture
def bccd(tmp_path) -> Path:
    return write_voc(tmp_path / "BCCD")


def all_images(data):
    return [image for images in data.splits.values() for image in images]


# ------------------------------------------------------------------------------ the written example
def test_example_reads_back_with_its_exact_boxes_classes_and_splits(bccd):
    data = read_voc(bccd)
    truth = example_objects()
    assert data.classes == BCCD_CLASSES and data.skipped == []
    assert {name: [i.stem for i in images] for name, images in data.splits.items()} == example_splits()
    for image in all_images(data):
        assert (image.height, image.width) == SIZE
        assert image.image_path == bccd / "JPEGImages" / f"{image.stem}.jpg"
        assert image.annotation_path == bccd / "Annotations" / f"{image.stem}.xml"
        assert image.boxes.dtype == np.float32 and image.boxes.shape == (len(truth[image.stem]), 4)
        assert image.labels.dtype == np.int64
        back = [(BCCD_CLASSES[k], *(int(v) for v in standard_to_voc(b))) for b, k in zip(image.boxes, image.labels)]
        assert back == truth[image.stem]
    assert set(np.concatenate([i.labels for i in all_images(data)]).tolist()) == {0, 1, 2}


def test_each_box_frames_its_drawn_cell_in_row_column_order(bccd):
    for image in all_images(read_voc(bccd)):
        pixels = load_image(image)
        assert pixels.shape == (3, *SIZE) and pixels.dtype == np.float32
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0
        for (row_lo, col_lo, row_hi, col_hi), k in zip(image.boxes.astype(int), image.labels):
            centre = pixels[:, (row_lo + row_hi - 1) // 2, (col_lo + col_hi - 1) // 2]
            np.testing.assert_allclose(centre, np.asarray(CELLS[BCCD_CLASSES[k]][0]) / 255, atol=0.12)


def test_example_is_deterministic_by_seed(tmp_path):
    first, again, other = (write_voc(tmp_path / name, seed=s) for name, s in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 8 + 8 + 4
    assert all((first / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (first / "Annotations/BloodImage_00000.xml").read_bytes() != \
        (other / "Annotations/BloodImage_00000.xml").read_bytes()  # fmt: skip


# ------------------------------------------------------------------------------ hand-written XMLs
def one_image(tmp_path, objects, size=(20, 30)) -> Path:
    """A VOC root with one image ``img`` of ``size`` (rows, columns), the given objects, listed in train.txt."""
    root = tmp_path / "one"
    (root / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (size[1], size[0]), (230, 200, 200)).save(root / "JPEGImages" / "img.jpg")
    write_annotation(root / "Annotations" / "img.xml", "img.jpg", size, objects)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("img\n")
    return root


def test_voc_one_based_inclusive_corners_become_zero_based_half_open_rows_and_columns(tmp_path):
    objects = [("RBC", 1, 5, 10, 7),  # the first ten columns, rows 5..7 (1-based)
               ("WBC", 21, 11, 30, 20),  # up to the far corner of the 20 x 30 image
               ("Platelets", 0, 1, 4, 21),  # 0-based tools: a pixel over the edge, clipped
               ("RBC", "2.5", "3", "7.5", "8")]  # fmt: skip
    image = read_voc(one_image(tmp_path, objects), splits=("train",)).splits["train"][0]
    expected = [[4, 0, 7, 10], [10, 20, 20, 30], [0, 0, 20, 4], [2, 1.5, 8, 7.5]]
    np.testing.assert_array_equal(image.boxes, np.asarray(expected, np.float32))
    assert image.labels.tolist() == [0, 1, 2, 0]
    assert voc_to_standard(1, 5, 10, 7) == (4, 0, 7, 10) and standard_to_voc((4, 0, 7, 10)) == (1, 5, 10, 7)


def test_zero_size_boxes_are_skipped_and_reported_by_file(tmp_path, caplog):
    objects = [("RBC", 1, 1, 5, 5), ("WBC", 7, 3, 7, 9), ("Platelets", 2, 10, 6, 10)]
    root = one_image(tmp_path, objects)
    with caplog.at_level(logging.WARNING, logger="medrobust"):
        data = read_voc(root, splits=("train",))
    image = data.splits["train"][0]
    assert image.boxes.tolist() == [[0, 0, 5, 5]] and image.labels.tolist() == [0]
    xml = root / "Annotations" / "img.xml"
    assert [(s.file, s.index, s.class_name, s.voc_box) for s in data.skipped] == \
        [(xml, 2, "WBC", (7, 3, 7, 9)), (xml, 3, "Platelets", (2, 10, 6, 10))]  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "medrobust"]
    assert len(warned) == 1
    assert f"{xml}: object 2 (WBC) has zero size" in warned[0] and f"{xml}: object 3 (Platelets)" in warned[0]


@pytest.mark.parametrize("filename", ["img.jpg", "img", None, "C:\\labelImg\\BCCD\\img.jpg", "/home/x/img.jpg"])
def test_the_image_is_found_in_jpegimages_whatever_the_filename_field_holds(tmp_path, filename):
    root = one_image(tmp_path, [("RBC", 1, 1, 5, 5)])
    write_annotation(root / "Annotations" / "img.xml", filename, (20, 30), [("RBC", 1, 1, 5, 5)])
    assert read_voc(root, splits=("train",)).splits["train"][0].image_path == root / "JPEGImages" / "img.jpg"


# ------------------------------------------------------------------------------ bad input
def rewrite_xml(root, stem, objects=(("RBC", 10, 10, 20, 20),), size=SIZE, filename="default") -> Path:
    filename = f"{stem}.jpg" if filename == "default" else filename
    return write_annotation(root / "Annotations" / f"{stem}.xml", filename, size, objects)


def break_file(root, relative, text) -> Path:
    (root / relative).write_text(text)
    return root / relative


XML = f"Annotations/{TRAIN_STEM}.xml"
JPEG = f"JPEGImages/{TRAIN_STEM}.jpg"
# name: (make the bad input and return the file the error must name, error type, words the message must hold)
BAD_INPUTS = {
    "missing image": (lambda r: ((r / JPEG).unlink(), r / XML)[1], FileNotFoundError, [JPEG]),
    "box outside": (lambda r: rewrite_xml(r, TRAIN_STEM, [("RBC", 100, 10, 130, 20)]), ValueError, ["outside"]),
    "box before the image": (lambda r: rewrite_xml(r, TRAIN_STEM, [("RBC", 10, -1, 20, 20)]), ValueError,
                             ["outside", "1 <= ymin"]),
    "xmin > xmax": (lambda r: rewrite_xml(r, TRAIN_STEM, [("WBC", 20, 10, 10, 20)]), ValueError,
                    ["object 1 (WBC)", "xmin <= xmax"]),
    "unknown class": (lambda r: rewrite_xml(r, TRAIN_STEM, [("RBC", 1, 1, 9, 9), ("Neutrophil", 10, 10, 20, 20)]),
                      ValueError, ["object 2", "'Neutrophil'", "['RBC', 'WBC', 'Platelets']"]),
    "parse error": (lambda r: break_file(r, XML, "<annotation><size><width>128</width>"), ValueError,
                    ["not well-formed XML"]),
    "not an annotation": (lambda r: break_file(r, XML, "<html></html>"), ValueError, ["<html>"]),
    "missing size": (lambda r: rewrite_xml(r, TRAIN_STEM, size=None), ValueError, ["no <size>"]),
    "non-numeric size": (lambda r: rewrite_xml(r, TRAIN_STEM, size=(96, "wide")), ValueError, ["'wide'"]),
    "missing corner": (lambda r: rewrite_xml(r, TRAIN_STEM, [("RBC", 10, 10, 20, None)]), ValueError,
                       ["<ymax> missing"]),
    "non-numeric corner": (lambda r: rewrite_xml(r, TRAIN_STEM, [("RBC", "12a", 10, 20, 20)]), ValueError,
                           ["<xmin> is '12a'"]),
    "JPEG of another size": (lambda r: Image.new("RGB", (64, 64)).save(r / JPEG) or r / JPEG, ValueError,
                             ["64 x 64", "128 x 96", XML]),
    "damaged JPEG": (lambda r: break_file(r, JPEG, "not a jpeg"), ValueError, ["unreadable"]),
    "two XMLs, one image": (lambda r: rewrite_xml(r, VAL_STEM, filename=f"{TRAIN_STEM}.jpg"), ValueError,
                            [XML, "expected each image annotated once"]),
    "split stem without XML": (lambda r: break_file(r, "ImageSets/Main/val.txt", f"{VAL_STEM}\nBloodImage_99999\n"),
                               FileNotFoundError, ["line 2", "Annotations/BloodImage_99999.xml"]),
    "split list missing": (lambda r: ((r / "ImageSets/Main/test.txt").unlink(), r / "ImageSets/Main/test.txt")[1],
                           FileNotFoundError, ["split list missing"]),
    "no Annotations folder": (lambda r: (shutil.rmtree(r / "Annotations"), r / "Annotations")[1], FileNotFoundError,
                              ["ImageSets/Main/<split>.txt"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_stops_naming_the_file(bccd, case):
    breaker, error, words = BAD_INPUTS[case]
    path = breaker(bccd)
    with pytest.raises(error) as info:
        read_voc(bccd)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_load_image_checks_the_decoded_size_and_names_the_file(bccd):
    image = next(i for i in read_voc(bccd).splits["train"] if i.stem == TRAIN_STEM)
    Image.new("RGB", (96, 128)).save(image.image_path)  # the XML's size, transposed
    with pytest.raises(ValueError, match="96 x 128 pixels") as info:
        load_image(image)
    assert str(image.image_path) in str(info.value) and str(image.annotation_path) in str(info.value)
    image.image_path.unlink()
    with pytest.raises(FileNotFoundError, match=str(image.image_path)):
        load_image(image)


# ------------------------------------------------------------------------------ splits
def test_an_image_in_two_splits_is_an_error(bccd):
    (bccd / "ImageSets/Main/test.txt").write_text(f"{TRAIN_STEM}\n")
    with pytest.raises(ValueError, match="expected each image in one split") as info:
        read_voc(bccd)
    message = str(info.value)
    assert f"{bccd}/ImageSets/Main/test.txt line 1: image {TRAIN_STEM!r} is in test" in message
    assert f"{bccd}/ImageSets/Main/train.txt line 1 puts it in train" in message


def test_a_stem_listed_twice_in_one_split_is_an_error(bccd):
    (bccd / "ImageSets/Main/val.txt").write_text(f"{VAL_STEM}\n\n{VAL_STEM}\n")
    with pytest.raises(ValueError, match="line 3: image .* already on line 1"):
        read_voc(bccd)


def test_without_imagesets_it_says_what_is_expected_or_splits_by_image_with_a_seed(bccd):
    shutil.rmtree(bccd / "ImageSets")
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main: split folder missing.*train.txt.*split="):
        read_voc(bccd)
    stems = [f"BloodImage_{i:05d}" for i in range(8)]
    partitions = []
    for seed in (0, 0, 1):
        data = read_voc(bccd, split=(0.5, 0.25, 0.25), seed=seed)
        listed = {name: [i.stem for i in images] for name, images in data.splits.items()}
        assert [len(v) for v in listed.values()] == [4, 2, 2] and sorted(sum(listed.values(), [])) == stems
        assert "seeded split" in data.split_source
        partitions.append(listed)
    assert partitions[0] == partitions[1] and partitions[0] != partitions[2]
    with pytest.raises(ValueError, match="summing to 1"):
        read_voc(bccd, split=(0.5, 0.5, 0.5))
