"""Detection datasets: VOC and COCO readers on small folders written here, and scattered-digits-det."""

from __future__ import annotations

import io
import json
import uuid

import fsspec
import pytest
import torch
from PIL import Image

from mocoray.data.base import CorruptImageError, DatasetNotFoundError, SkipCorrupt
from mocoray.data.detection import (
    RandomHorizontalFlip,
    coco_detection,
    collate_detection,
    scattered_digits_det,
    voc_detection,
)
from mocoray.data.detection.digits import CANVAS, MAX_DIGITS
from mocoray.data.detection.voc import voc_class_list
from mocoray.data.digits import _split_sources
from mocoray.detection.model import build_detector


def _jpeg(width: int, height: int, shade: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _voc_xml(objects: list[tuple], size: tuple[int, int] | None = (40, 30)) -> str:
    """objects: (name, xmin, ymin, xmax, ymax, difficult) in VOC's 1-based inclusive pixels."""
    size_xml = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    objs = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for n, x0, y0, x1, y1, d in objects
    )
    return f"<annotation><folder>VOC</folder>{size_xml}{objs}</annotation>"


def write_voc(root: str, images: dict[str, dict[str, tuple]]) -> None:
    """images: {year: {split: [(image id, objects, size), ...]}} -> a VOCdevkit tree at `root` (any fsspec URL)."""
    fs, base = fsspec.core.url_to_fs(root)
    for year, splits in images.items():
        folder = f"{base}/VOCdevkit/VOC{year}"
        for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
            fs.makedirs(f"{folder}/{sub}", exist_ok=True)
        for split, entries in splits.items():
            with fs.open(f"{folder}/ImageSets/Main/{split}.txt", "w") as f:
                f.write("".join(f"{image_id}\n" for image_id, _, _ in entries))
            for image_id, objects, size in entries:
                with fs.open(f"{folder}/Annotations/{image_id}.xml", "w") as f:
                    f.write(_voc_xml(objects, size))
                with fs.open(f"{folder}/JPEGImages/{image_id}.jpg", "wb") as f:
                    f.write(_jpeg(40, 30))


VOC_TREE = {
    "2007": {
        "trainval": [
            ("000001", [("dog", 1, 1, 10, 20, False), ("person", 5, 6, 30, 25, True)], (40, 30)),
            ("000002", [("person", 11, 2, 20, 12, True)], (40, 30)),  # only a difficult object
        ],
        "test": [("000003", [("cat", 2, 3, 39, 29, False)], (40, 30))],
    },
    "2012": {"trainval": [("2012_000001", [("tvmonitor", 3, 4, 13, 14, False)], None)]},  # no <size>
}


@pytest.fixture()
def voc_root(tmp_path) -> str:
    root = str(tmp_path / "voc")
    write_voc(root, VOC_TREE)
    return root


def test_voc_concatenates_sets_with_continuous_boxes_labels_and_difficult_flags(voc_root) -> None:
    ds = voc_detection(voc_root, ["2007-trainval", ("2012", "trainval")])
    assert len(ds) == 3 and ds.num_classes == 20
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    # VOC's (1, 1, 10, 20) covers pixels 1..10 x 1..20 (1-based): continuous (0, 0, 10, 20)
    assert target["boxes"].tolist() == [[0, 0, 10, 20], [4, 5, 30, 25]]
    assert target["boxes"].dtype == torch.float32
    assert target["labels"].tolist() == [12, 15]  # dog, person: 1 + index in VOC_CLASSES
    assert target["difficult"].tolist() == [False, True] and target["image_id"] == 0
    assert [ds[i][1]["image_id"] for i in range(3)] == [0, 1, 2]
    assert ds[2][1]["labels"].tolist() == [20]  # the 2012 image without <size>: read from the JPEG header
    assert ds.counts.per_source == {"2007-trainval": 2, "2012-trainval": 1}
    assert ds.counts.as_dict()["images.2012-trainval"] == 1
    assert ds.counts.images_empty == 0 and ds.counts.boxes == 4


def test_voc_training_view_drops_difficult_objects_and_the_images_left_empty_counting_both(voc_root) -> None:
    ds = voc_detection(voc_root, ["2007-trainval"], keep_difficult=False, skip_empty=True)
    assert len(ds) == 1 and ds[0][1]["difficult"].tolist() == [False]
    assert ds.counts.boxes_flagged_dropped == 2 and ds.counts.images_empty_dropped == 1
    kept = voc_detection(voc_root, ["2007-trainval"], keep_difficult=False)
    assert len(kept) == 2 and kept.counts.images_empty == 1 and kept[1][1]["boxes"].shape == (0, 4)


def test_voc_over_fsspec_memory_filesystem() -> None:
    root = f"memory://voc-{uuid.uuid4().hex}"
    write_voc(root, {"2007": {"test": VOC_TREE["2007"]["test"]}})
    ds = voc_detection(root, ["2007-test"])
    assert ds[0][1]["boxes"].tolist() == [[1, 2, 39, 29]] and ds.records[0].path.endswith("000003.jpg")


def test_voc_boxes_outside_the_image_are_clipped_and_degenerate_ones_dropped_and_counted(tmp_path) -> None:
    root = str(tmp_path / "voc")
    objects = [("cat", 30, 20, 55, 45, False), ("cat", 8, 8, 7, 12, False), ("cat", 41, 1, 50, 9, False)]
    write_voc(root, {"2007": {"test": [("000001", objects, (40, 30))]}})
    ds = voc_detection(root, ["2007-test"])
    # clipped to 40 x 30; x1 < x0 is degenerate; the box starting right of the image has no area left
    assert ds[0][1]["boxes"].tolist() == [[29, 19, 40, 30]]
    assert ds.counts.boxes_clipped == 1 and ds.counts.boxes_degenerate == 2
    # what is left is what torchvision accepts: a training step runs instead of failing its box assertion
    images, targets, _ = collate_detection([ds[0]])
    model = build_detector("small_resnet", 20, layout="fpn", min_size=32, max_size=64, fpn_channels=16,
                           representation_size=32, anchor_sizes=(8, 16, 32, 64))
    losses = model([images[0].float() / 255], [{k: targets[0][k] for k in ("boxes", "labels")}])
    assert all(torch.isfinite(v) for v in losses.values())


def test_voc_missing_paths_empty_split_and_unknown_class_are_clear_errors(voc_root, tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"data\.root: .*nowhere does not exist"):
        voc_detection(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match=r"no VOC2010 folder .*VOCdevkit/VOC2010"):
        voc_detection(voc_root, ["2010-trainval"])
    with pytest.raises(DatasetNotFoundError, match=r"VOC2012 has no split 'test'.*splits found: trainval"):
        voc_detection(voc_root, ["2012-test"], field="detect.data.root")
    with pytest.raises(ValueError, match="write it as YEAR-SPLIT"):
        voc_detection(voc_root, ["trainval"])
    empty = str(tmp_path / "empty")
    write_voc(empty, {"2007": {"test": []}})
    with pytest.raises(ValueError, match=r"VOC2007 split 'test' is empty"):
        voc_detection(empty, ["2007-test"])
    odd = str(tmp_path / "odd")
    write_voc(odd, {"2007": {"test": [("000001", [("unicorn", 1, 1, 5, 5, False)], (40, 30))]}})
    with pytest.raises(ValueError, match=r"000001\.xml: object class 'unicorn' is not one of the 20 classes"):
        voc_detection(odd, ["2007-test"])


# a labelImg-style folder with its own classes
FRUIT_TREE = {"2007": {
    "trainval": [("a1", [("apple", 1, 1, 10, 20, False), ("kiwi", 5, 6, 30, 25, False)], (40, 30))],
    "test": [("b1", [("pear", 2, 3, 39, 29, False)], (40, 30))],
}}


def test_voc_classes_come_from_data_classes_then_labels_txt_then_vocs_20(tmp_path) -> None:
    root = str(tmp_path / "fruit")
    write_voc(root, FRUIT_TREE)
    year = tmp_path / "fruit" / "VOCdevkit" / "VOC2007"
    both = [(root, ["2007-trainval"], "data.root"), (root, ["2007-test"], "data.root")]
    default = voc_class_list(None, both)
    assert len(default.names) == 20 and default.names[11] == "dog" and default.source.startswith("VOC's 20")

    # labels.txt beside Annotations/: one class per line, blank lines and surrounding whitespace ignored
    (year / "labels.txt").write_text("\n  apple \npear\n\n\tkiwi\n")
    found = voc_class_list(None, both)
    assert found.names == ["apple", "pear", "kiwi"] and found.source == str(year / "labels.txt")
    ds = voc_detection(root, ["2007-trainval"], classes=found.names)
    assert ds.classes == ["apple", "pear", "kiwi"] and ds.num_classes == 3
    assert ds[0][1]["labels"].tolist() == [1, 3]  # apple, kiwi: 1 + index in labels.txt

    # data.classes wins over a labels.txt, and says which file it overrides
    chosen = voc_class_list(["kiwi", "pear", "apple"], both)
    assert chosen.names == ["kiwi", "pear", "apple"] and chosen.source == "data.classes"
    assert chosen.note == (f"data.classes (3 classes) is used; {year / 'labels.txt'} lists other classes "
                           "and is ignored")
    assert voc_class_list(["apple", "pear", "kiwi"], both).note is None  # the same list: nothing to say

    # the dataset root (and VOCdevkit/) are beside the annotations too; all labels.txt found must agree
    (tmp_path / "fruit" / "labels.txt").write_text("apple\npear\n")
    with pytest.raises(ValueError, match=r"data.root: .*fruit/labels.txt \(apple, pear\) and .*VOC2007/labels.txt "
                       r"\(apple, pear, kiwi\) list different classes; keep one labels.txt, or set data.classes"):
        voc_class_list(None, both)
    (year / "labels.txt").unlink()
    assert voc_class_list(None, both).names == ["apple", "pear"]
    (tmp_path / "fruit" / "labels.txt").write_text("apple\npear\napple\n")
    with pytest.raises(ValueError, match=r"fruit/labels.txt: class names given more than once: apple"):
        voc_class_list(None, both)
    (tmp_path / "fruit" / "labels.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"fruit/labels.txt: no class names"):
        voc_class_list(None, both)
    assert voc_class_list(["apple"], both).note.endswith("fruit/labels.txt lists other classes and is ignored")
    (tmp_path / "fruit" / "labels.txt").write_bytes("apple\r\npear\r\n".encode("utf-8-sig"))  # a Windows editor's
    assert voc_class_list(None, both).names == ["apple", "pear"]


def test_voc_object_of_an_unlisted_class_names_the_file_the_class_and_where_classes_are_listed(tmp_path) -> None:
    root = str(tmp_path / "fruit")
    write_voc(root, FRUIT_TREE)
    with pytest.raises(ValueError, match=r"VOC2007/Annotations/b1\.xml: object class 'pear' is not one of the 2 "
                       r"classes \(apple, kiwi\); list the dataset's classes in data.classes or in a labels.txt"):
        voc_detection(root, ["2007-trainval", "2007-test"], classes=["apple", "kiwi"])


def test_voc_unreadable_annotation_is_left_out_and_a_missing_image_skipped_and_counted(voc_root) -> None:
    folder = f"{voc_root}/VOCdevkit/VOC2007"
    with open(f"{folder}/Annotations/000002.xml", "w") as f:
        f.write("<annotation><object>")  # truncated
    ds = voc_detection(voc_root, ["2007-trainval"])
    assert len(ds) == 1 and ds.counts.images_unreadable_annotation == 1
    write_voc(voc_root, VOC_TREE)
    ds = voc_detection(voc_root, ["2007-trainval"])
    (fsspec.filesystem("file")).rm(f"{folder}/JPEGImages/000001.jpg")
    with pytest.raises(CorruptImageError, match="000001.jpg"):
        ds[0]
    images, targets, skipped = collate_detection([SkipCorrupt(ds)[0], SkipCorrupt(ds)[1]])
    assert skipped == 1 and [t["image_id"] for t in targets] == [1, 1]


def _coco_files(tmp_path, annotations: list[dict], images: list[dict] | None = None) -> tuple[str, str]:
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    images = images or [{"id": 7, "file_name": "a.jpg", "width": 40, "height": 30},
                        {"id": 9, "file_name": "b.jpg", "width": 40, "height": 30},
                        {"id": 11, "file_name": "c.jpg"}]  # no size given: read from the file
    for entry in images:
        (image_dir / entry["file_name"]).write_bytes(_jpeg(40, 30))
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return str(path), str(image_dir)


def test_coco_maps_category_ids_to_contiguous_labels_and_keeps_crowd_and_empty_images(tmp_path) -> None:
    anns = [
        {"id": 1, "image_id": 7, "category_id": 90, "bbox": [1, 2, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 5, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        {"id": 3, "image_id": 11, "category_id": 1, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # clipped
        {"id": 4, "image_id": 11, "category_id": 1, "bbox": [3, 3, 0, 4], "iscrowd": 0},  # zero width
        {"id": 5, "image_id": 8, "category_id": 1, "bbox": [3, 3, 4, 4], "iscrowd": 0},  # unknown image
        {"id": 6, "image_id": 7, "category_id": 2, "bbox": [3, 3, 4, 4], "iscrowd": 0},  # unknown category
    ]
    ann_file, image_dir = _coco_files(tmp_path, anns)
    ds = coco_detection(ann_file, image_dir)
    assert ds.classes == ["person", "airplane", "toothbrush"] and ds.num_classes == 3
    assert len(ds) == 3
    _, t = ds[0]
    assert t["boxes"].tolist() == [[1, 2, 11, 7], [0, 0, 40, 30]]  # xywh -> xyxy
    assert t["labels"].tolist() == [3, 2] and t["iscrowd"].tolist() == [False, True]
    assert ds[1][1]["boxes"].shape == (0, 4)  # image 9 has no annotation: kept, empty
    assert ds[2][1]["boxes"].tolist() == [[30, 20, 40, 30]]
    c = ds.counts
    assert (c.images_empty, c.boxes_clipped, c.boxes_degenerate, c.boxes_unknown_image, c.boxes_unknown_category) \
        == (1, 1, 1, 1, 1)
    train = coco_detection(ann_file, image_dir, keep_crowd=False, skip_empty=True)
    assert len(train) == 2 and train.counts.boxes_flagged_dropped == 1 and train.counts.images_empty_dropped == 1
    assert train[0][1]["iscrowd"].tolist() == [False]


def test_coco_missing_or_malformed_inputs_are_clear_errors(tmp_path) -> None:
    ann_file, image_dir = _coco_files(tmp_path, [])
    with pytest.raises(DatasetNotFoundError, match=r"data\.annotations: .*missing\.json does not exist"):
        coco_detection(str(tmp_path / "missing.json"), image_dir)
    with pytest.raises(DatasetNotFoundError, match=r"data\.images: .*nope does not exist"):
        coco_detection(ann_file, str(tmp_path / "nope"))
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="is not a COCO instances file"):
        coco_detection(str(tmp_path / "bad.json"), image_dir)
    (tmp_path / "none.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="lists no images"):
        coco_detection(str(tmp_path / "none.json"), image_dir)
    with pytest.raises(ValueError, match="no usable image left"):
        coco_detection(ann_file, image_dir, skip_empty=True)


def test_scattered_digits_det_is_deterministic_with_one_to_five_ink_boxed_digits() -> None:
    train, val = scattered_digits_det(60, 20)
    again, _ = scattered_digits_det(60, 20)
    other, _ = scattered_digits_det(60, 20, seed=1)
    assert torch.equal(train.images, again.images) and not torch.equal(train.images, other.images)
    assert all(torch.equal(a, b) for a, b in zip(train.boxes, again.boxes, strict=True))
    assert train.images.shape == (60, 3, CANVAS, CANVAS) and train.num_classes == 10
    counts = [len(b) for b in train.boxes + val.boxes]
    assert min(counts) >= 1 and max(counts) <= MAX_DIGITS and len(set(counts)) > 1
    for i in range(len(train)):
        image, target = train[i]
        assert target["labels"].min() >= 1 and target["labels"].max() <= 10 and target["image_id"] == i
        ink = image[0] > 0
        for x0, y0, x1, y1 in target["boxes"].long().tolist():
            inside = ink[y0:y1, x0:x1]  # tight: ink touches all four sides of the box
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        if len(target["boxes"]) == 1:  # alone on its canvas: the box is exactly the bounding box of all ink
            rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
            assert target["boxes"][0].tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_scattered_digits_det_splits_by_source_digit_like_scattered_digits() -> None:
    train, val = scattered_digits_det(80, 40)
    train_src, val_src = _split_sources(1797)
    used_train = set(torch.cat(train.box_sources).tolist())
    used_val = set(torch.cat(val.box_sources).tolist())
    assert used_train <= set(train_src.tolist()) and used_val <= set(val_src.tolist())
    assert not used_train & used_val


def test_horizontal_flip_mirrors_boxes_with_the_image() -> None:
    image = torch.zeros(3, 10, 20, dtype=torch.uint8)
    image[:, 2:5, 1:4] = 255
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([1])}
    flipped, t = RandomHorizontalFlip(p=1.0)(image, target)
    assert t["boxes"].tolist() == [[16, 2, 19, 5]] and flipped[0, 2:5, 16:19].all()
    assert flipped[0].sum() == image[0].sum()
