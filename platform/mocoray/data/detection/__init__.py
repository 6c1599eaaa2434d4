"""Detection datasets (Pascal VOC, COCO, scattered-digits-det) with one item format; see `base`."""

from .base import (
    AnnotationCounts,
    FileDetections,
    RandomHorizontalFlip,
    Target,
    collate_detection,
    make_target,
)
from .coco import coco_detection
from .digits import ScatteredDigitsDet, scattered_digits_det
from .voc import PAPER_TEST_SETS, PAPER_TRAIN_SETS, VOC_CLASSES, check_voc_sets, voc_detection

__all__ = [
    "PAPER_TEST_SETS",
    "PAPER_TRAIN_SETS",
    "VOC_CLASSES",
    "AnnotationCounts",
    "FileDetections",
    "RandomHorizontalFlip",
    "ScatteredDigitsDet",
    "Target",
    "check_voc_sets",
    "coco_detection",
    "collate_detection",
    "make_target",
    "scattered_digits_det",
    "voc_detection",
]
