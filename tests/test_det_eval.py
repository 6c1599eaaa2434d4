"""Detection metrics on hand-checked toy cases: COCOeval's AP/AP50/AP75 and our VOC07 11-point AP."""

from __future__ import annotations

import math

import pytest
import torch

from mocoray.detection.evaluation import coco_metrics, voc07_ap, voc07_metrics


def gt(*boxes, labels=None, difficult=None, iscrowd=None) -> dict:
    n = len(boxes)
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
           "labels": torch.tensor(labels or [1] * n)}
    if difficult is not None:
        out["difficult"] = torch.tensor(difficult)
    if iscrowd is not None:
        out["iscrowd"] = torch.tensor(iscrowd)
    return out


def pred(*scored_boxes, labels=None) -> dict:
    """scored_boxes: (score, x0, y0, x1, y1)."""
    n = len(scored_boxes)
    t = torch.tensor(scored_boxes, dtype=torch.float32).reshape(n, 5)
    return {"boxes": t[:, 1:], "scores": t[:, 0], "labels": torch.tensor(labels or [1] * n)}


A, B = (0, 0, 10, 10), (20, 20, 30, 30)
FAR = (50, 50, 60, 60)


def test_perfect_boxes_give_ap_one() -> None:
    truth = {0: gt(A, B, labels=[1, 2]), 1: gt(B, labels=[1])}
    predictions = {0: pred((0.9, *A), (0.8, *B), labels=[1, 2]), 1: pred((0.7, *B))}
    assert coco_metrics(truth, predictions) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})
    assert voc07_metrics(truth, predictions) == pytest.approx({"AP": 1.0, "AP50": 1.0, "AP75": 1.0})


def test_a_box_at_iou_0625_counts_for_ap50_not_ap75() -> None:
    # the detection covers the top 6.25 of the 10 rows: IoU = 62.5 / 100 = 0.625
    truth, predictions = {0: gt(A)}, {0: pred((0.9, 0, 0, 10, 6.25))}
    # it matches at IoU thresholds 0.50, 0.55, 0.60 (3 of the 10 in 0.50:0.95), with AP 1 at each: AP = 0.3
    assert coco_metrics(truth, predictions) == pytest.approx({"AP": 0.3, "AP50": 1.0, "AP75": 0.0})
    assert voc07_metrics(truth, predictions) == pytest.approx({"AP": 0.3, "AP50": 1.0, "AP75": 0.0})


def test_a_higher_scored_false_positive_lowers_ap_by_the_hand_computed_amount() -> None:
    truth = {0: gt(A, B)}
    # ranked: TP (A), FP (far away), TP (B): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    predictions = {0: pred((0.9, *A), (0.8, *FAR), (0.7, *B))}
    # COCO, 101 recall points 0, 0.01, .., 1: the interpolated precision is 1 up to recall 0.50 (51
    # points) and 2/3 above (50 points): (51 + 50 * 2/3) / 101 = 253 / 303 = 0.83498. The same at every
    # IoU threshold (the boxes are exact), so AP = AP50 = AP75.
    expected = 253 / 303
    assert coco_metrics(truth, predictions) == pytest.approx({"AP": expected, "AP50": expected, "AP75": expected})
    # VOC07, 11 recall points 0, 0.1, .., 1: 1 for 0..0.5 (6 points), 2/3 for 0.6..1 (5): 28/33 = 0.84848
    assert voc07_ap(truth, predictions)[0] == pytest.approx((6 + 5 * 2 / 3) / 11)
    # without the false positive both are 1
    clean = {0: pred((0.9, *A), (0.7, *B))}
    assert coco_metrics(truth, clean)["AP"] == pytest.approx(1.0) and voc07_ap(truth, clean)[0] == pytest.approx(1.0)
    # a lower-scored false positive costs nothing: it comes after full recall
    late = {0: pred((0.9, *A), (0.8, *B), (0.1, *FAR))}
    assert coco_metrics(truth, late)["AP"] == pytest.approx(1.0) and voc07_ap(truth, late)[0] == pytest.approx(1.0)


def test_voc07_ignores_detections_of_difficult_objects_and_does_not_count_them_as_missed() -> None:
    # the first detection hits the difficult object B: neither TP nor FP; A is the only object to find
    predictions = {0: pred((0.9, *B), (0.8, *A))}
    assert voc07_ap({0: gt(A, B, difficult=[False, True])}, predictions)[0] == pytest.approx(1.0)
    # were B simply absent from the ground truth, that detection would be a higher-scored false
    # positive: precision 0 then 1/2 at recall 1, so every one of the 11 points is 1/2
    assert voc07_ap({0: gt(A)}, predictions)[0] == pytest.approx(0.5)
    # a missed difficult object costs nothing either
    assert voc07_ap({0: gt(A, B, difficult=[False, True])}, {0: pred((0.8, *A))})[0] == pytest.approx(1.0)
    # and the COCO-style metric treats it as a crowd region: ignored too
    assert coco_metrics({0: gt(A, B, difficult=[False, True])}, predictions)["AP"] == pytest.approx(1.0)


def test_coco_crowd_regions_neither_reward_nor_penalise() -> None:
    crowd = (0, 0, 40, 40)
    truth = {0: gt(crowd, (50, 50, 70, 70), iscrowd=[True, False])}
    predictions = {0: pred((0.9, 5, 5, 15, 15), (0.8, 50, 50, 70, 70))}  # the first lies inside the crowd
    assert coco_metrics(truth, predictions)["AP"] == pytest.approx(1.0)


def test_duplicate_detections_and_missed_images_are_false_positives_and_misses() -> None:
    truth = {0: gt(A), 1: gt(B)}
    # image 1 has no prediction entry: B is missed; the duplicate on A is a false positive
    predictions = {0: pred((0.9, *A), (0.8, *A))}
    # ranked: TP, FP; recall reaches only 1/2 with precision 1: VOC07 points 0..0.5 -> 1, rest 0 -> 6/11
    assert voc07_ap(truth, predictions)[0] == pytest.approx(6 / 11)
    # COCO: 51 of 101 recall points at precision 1
    assert coco_metrics(truth, predictions)["AP50"] == pytest.approx(51 / 101)


def test_classes_are_averaged_and_empty_inputs_are_defined() -> None:
    truth = {0: gt(A, B, labels=[1, 2])}
    only_class_one = {0: pred((0.9, *A), labels=[1])}
    ap, per_class = voc07_ap(truth, only_class_one)
    assert per_class == pytest.approx({1: 1.0, 2: 0.0}) and ap == pytest.approx(0.5)
    assert coco_metrics(truth, only_class_one)["AP"] == pytest.approx(0.5)
    assert coco_metrics(truth, {}) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    assert all(math.isnan(v) for v in coco_metrics({0: gt()}, {}).values())
    assert math.isnan(voc07_ap({0: gt()}, {})[0])
    with pytest.raises(ValueError, match="without ground truth"):
        coco_metrics(truth, {5: pred((0.9, *A))})
