"""Detection metrics from in-memory boxes: COCO-style AP / AP50 / AP75 (pycocotools) and VOC07's 11-point AP.

Both take `ground_truth` and `predictions` keyed by image id. A ground-truth entry has `boxes`
(N x 4, x0 y0 x1 y1 in pixels), `labels` (1..C) and optionally `difficult` / `iscrowd` (bool N); a
prediction has `boxes`, `scores` and `labels`, as torchvision's detectors return them. Images with
ground truth but no prediction entry count as images where nothing was detected.

Objects marked `difficult` (VOC) or `iscrowd` (COCO) are ignored as each benchmark ignores them: a
detection that matches one is neither a true nor a false positive, and they are not among the
objects to find. Under COCOeval both go in as crowd regions (its only ignore mechanism; it matches
crowds by the share of the detection inside them). Values are fractions (0..1); NaN when there is
no object to find at all.
"""

from __future__ import annotations

import builtins
import contextlib
import io
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torchvision.ops import box_iou

PAPER_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55, ..., 0.95


def _ignored(target: Mapping) -> torch.Tensor:
    n = target["boxes"].shape[0]
    no = torch.zeros(n, dtype=torch.bool)
    return target.get("difficult", no).bool() | target.get("iscrowd", no).bool()


def _check_ids(ground_truth: Mapping, predictions: Mapping) -> None:
    extra = sorted(set(predictions) - set(ground_truth))
    if extra:
        raise ValueError(f"predictions for {len(extra)} image ids without ground truth (first: {extra[:5]})")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No output from pycocotools (progress lines, its summary table), also where `print` itself has been
    replaced: Ray Train's workers log every print call, redirected or not."""
    saved = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        builtins.print = saved


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().double().cpu()
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


def coco_metrics(ground_truth: Mapping[int, Mapping], predictions: Mapping[int, Mapping]) -> dict[str, float]:
    """{"AP": AP at IoU 0.50:0.95, "AP50", "AP75"} by pycocotools' COCOeval (bbox, all areas, 100
    detections per image)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _check_ids(ground_truth, predictions)
    annotations, categories = [], set()
    for image_id, t in ground_truth.items():
        crowd = _ignored(t).tolist()
        for box, label, is_crowd in zip(_xywh(t["boxes"]), t["labels"].tolist(), crowd, strict=True):
            # ids start at 1: COCOeval takes a match id of 0 to mean "unmatched"
            annotations.append({"id": len(annotations) + 1, "image_id": int(image_id),
                                "category_id": int(label), "bbox": box, "area": box[2] * box[3],
                                "iscrowd": int(is_crowd)})
            categories.add(int(label))
    results = []
    for image_id, p in predictions.items():
        scores, labels = p["scores"].tolist(), p["labels"].tolist()
        for box, score, label in zip(_xywh(p["boxes"]), scores, labels, strict=True):
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box,
                            "score": float(score)})
            categories.add(int(label))
    if not any(a["iscrowd"] == 0 for a in annotations):
        return {"AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if not results:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with _quiet():
        gt = COCO()
        gt.dataset = {"images": [{"id": int(i)} for i in ground_truth], "annotations": annotations,
                      "categories": [{"id": c} for c in sorted(categories)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(s) if s >= 0 else float("nan") for s in evaluator.stats[:3]]
    return {"AP": stats[0], "AP50": stats[1], "AP75": stats[2]}


def _voc07_class_ap(
    ground_truth: Mapping[int, Mapping], predictions: Mapping[int, Mapping], label: int, iou_threshold: float
) -> float | None:
    """11-point AP of one class; None when the class has no (non-difficult) object to find."""
    gts = {}
    for image_id, t in ground_truth.items():
        mine = t["labels"] == label
        if mine.any():
            taken = torch.zeros(int(mine.sum()), dtype=torch.bool)
            gts[image_id] = (t["boxes"][mine].float(), _ignored(t)[mine], taken)
    positives = sum(int((~ignored).sum()) for _, ignored, _ in gts.values())
    if positives == 0:
        return None
    dets = []
    for image_id, p in predictions.items():
        mine = p["labels"] == label
        boxes, scores = p["boxes"][mine].float(), p["scores"][mine]
        dets += [(float(s), image_id, box) for box, s in zip(boxes, scores, strict=True)]
    dets.sort(key=lambda d: -d[0])  # stable: ties keep image order
    tp, fp = [], []
    for _, image_id, box in dets:
        if image_id not in gts:
            tp.append(0)
            fp.append(1)
            continue
        boxes, ignored, used = gts[image_id]
        ious = box_iou(box[None], boxes)[0]
        best = int(ious.argmax())
        if ious[best] > iou_threshold:  # VOC's test is strict
            if ignored[best]:
                continue  # a difficult object: this detection is neither right nor wrong
            hit = not used[best]
            used[best] = True
        else:
            hit = False
        tp.append(int(hit))
        fp.append(int(not hit))
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    recall = tp_cum / positives
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def voc07_ap(
    ground_truth: Mapping[int, Mapping], predictions: Mapping[int, Mapping], iou_threshold: float = 0.5
) -> tuple[float, dict[int, float]]:
    """(mean over classes, {label: AP}) of the VOC2007 11-point AP at `iou_threshold`.

    Per class, detections in decreasing score order are true positives when their best-overlapping
    object of the class (IoU > threshold) is not yet taken, ignored when that object is difficult,
    false positives otherwise; AP is the mean over recall 0, 0.1, ..., 1 of the best precision at
    that recall or higher. Classes with no non-difficult object are left out of the mean. IoU uses
    continuous coordinates (as COCOeval does), not the devkit's +1-pixel convention."""
    _check_ids(ground_truth, predictions)
    labels = sorted({int(v) for t in ground_truth.values() for v in t["labels"].tolist()})
    per_class = {}
    for label in labels:
        ap = _voc07_class_ap(ground_truth, predictions, label, iou_threshold)
        if ap is not None:
            per_class[label] = ap
    mean = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    return mean, per_class


def voc07_metrics(
    ground_truth: Mapping[int, Mapping], predictions: Mapping[int, Mapping]
) -> dict[str, float]:
    """{"AP50", "AP75", "AP"}: the VOC07 11-point mAP at IoU 0.5, at 0.75, and its mean over
    0.50:0.95 — how detectron2's VOC evaluator, and so the MoCo paper's VOC table, define them."""
    at = {t: voc07_ap(ground_truth, predictions, t)[0] for t in PAPER_IOU_THRESHOLDS}
    return {"AP50": at[0.5], "AP75": at[0.75], "AP": float(np.mean(list(at.values())))}
