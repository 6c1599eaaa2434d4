"""COCO-format detection (an instances JSON file + an image folder), read through fsspec.

Category ids (COCO's run 1..90 with gaps) map to contiguous labels 1..C in the order of their ids;
`dataset.classes` holds the names in that order. Crowd annotations (`iscrowd: 1`, one box around
many objects) stay as a flag: the COCO metric ignores detections that fall on them, and training
leaves them out (`keep_crowd=False`), as torchvision's and detectron2's COCO recipes do.
"""

from __future__ import annotations

import json
import logging
import posixpath

import torch

from ..base import CorruptImageError
from ..files import display, image_size, read_bytes, resolve
from .base import AnnotationCounts, FileDetections, ImageRecord, ItemTransform, clean_record, finish_records

log = logging.getLogger(__name__)


def _xyxy(bbox) -> list[float]:
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return [float("nan")] * 4  # malformed: becomes a counted degenerate box
    return [x, y, x + w, y + h]


def coco_detection(
    annotations: str,
    images: str,
    *,
    keep_crowd: bool = True,
    skip_empty: bool = False,
    transform: ItemTransform | None = None,
    annotations_field: str = "data.annotations",
    images_field: str = "data.images",
) -> FileDetections:
    """Every image the `annotations` JSON lists, with its boxes, images read from the `images` folder.

    Images without annotations are served with no boxes (COCO val has some; `skip_empty=True` leaves
    them out, the usual choice for training). Boxes outside the image are clipped, degenerate ones
    dropped, annotations of unknown images or categories dropped; all counted in `.counts`."""
    fs, ann_path = resolve(annotations, annotations_field)
    image_fs, image_root = resolve(images, images_field)
    where = display(fs, ann_path)
    try:
        data = json.loads(read_bytes(fs, ann_path))
        image_entries, categories = data["images"], data["categories"]
        ann_entries = data.get("annotations", [])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{annotations_field}: {where} is not a COCO instances file (needs 'images', "
                         f"'annotations', 'categories'): {type(err).__name__}: {err}") from None
    if not image_entries:
        raise ValueError(f"{annotations_field}: {where} lists no images")
    categories = sorted(categories, key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    by_image: dict[int, list[dict]] = {e["id"]: [] for e in image_entries}
    counts = AnnotationCounts()
    for ann in ann_entries:
        if ann.get("image_id") not in by_image:
            counts.boxes_unknown_image += 1
        elif ann.get("category_id") not in label_of:
            counts.boxes_unknown_category += 1
        else:
            by_image[ann["image_id"]].append(ann)
    records = []
    for entry in image_entries:
        path = posixpath.join(image_root, entry["file_name"])
        width, height = entry.get("width") or 0, entry.get("height") or 0
        if not width or not height:
            try:
                width, height = image_size(image_fs, path)
            except CorruptImageError as err:
                counts.images_unreadable_annotation += 1
                log.warning("leaving out %s: no size in %s and the image is unreadable (%s)",
                            path, where, err)
                continue
        anns = by_image[entry["id"]]
        record = ImageRecord(
            path, len(records), int(width), int(height),
            torch.tensor([_xyxy(a.get("bbox")) for a in anns], dtype=torch.float32).reshape(-1, 4),
            torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            torch.zeros(len(anns), dtype=torch.bool),
            torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool),
            posixpath.basename(ann_path),
        )
        records.append(clean_record(record, counts, drop_flagged=not keep_crowd, flag="iscrowd"))
    kept = finish_records(records, counts, skip_empty, f"{annotations_field}: {where}")
    classes = [str(c.get("name", c["id"])) for c in categories]
    return FileDetections(image_fs, kept, classes, counts, transform)
