"""The pure-torch detection loops: a few steps on scattered-digits-det learn; a NaN loss stops the run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mocoray.core.moco import NonFiniteLossError
from mocoray.data.detection import collate_detection, scattered_digits_det
from mocoray.detection.engine import evaluate, train_one_epoch
from mocoray.detection.model import build_detector

# the CPU settings of the digits detector: 64 px canvases, small anchors, few proposals and RoIs
CPU_DETECTOR = {
    "layout": "fpn", "min_size": 64, "max_size": 64, "anchor_sizes": (8, 16, 32, 64), "fpn_channels": 32,
    "representation_size": 128, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64,
}


@pytest.fixture(scope="module")
def digits():
    return scattered_digits_det(48, 8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loader(ds, batch_size: int = 8) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=True, collate_fn=collate_detection,
                      generator=torch.Generator().manual_seed(0))


def test_a_few_training_steps_on_scattered_digits_det_reduce_the_loss(digits) -> None:
    train, val = digits
    torch.manual_seed(0)
    model = build_detector("small_resnet", 10, **CPU_DETECTOR)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    lrs = []
    first = train_one_epoch(model, optimizer, _loader(train), max_steps=1, lr_at=lambda s: lrs.append(s) or 0.02)
    step = first.global_step
    for _ in range(2):
        step = train_one_epoch(model, optimizer, _loader(train), global_step=step, lr_at=lambda s: 0.02).global_step
    last = train_one_epoch(model, optimizer, _loader(train), global_step=step, max_steps=3)
    assert lrs == [0] and first.steps == 1 and first.images == 8 and step == 13 and last.global_step == 16
    assert set(first.losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert first.loss == pytest.approx(sum(first.losses.values()), rel=1e-5)
    assert last.loss < 0.7 * first.loss, (first, last)

    predictions, truth = evaluate(model, _loader(val, batch_size=4))
    assert sorted(predictions) == sorted(truth) == list(range(len(val)))
    assert torch.equal(truth[3]["boxes"], val.target(3)["boxes"])
    assert set(predictions[0]) == {"boxes", "scores", "labels"} and predictions[0]["boxes"].shape[1] == 4
    assert not model.training


def test_a_non_finite_loss_stops_before_the_weights_change(digits) -> None:
    model = build_detector("small_resnet", 10, **CPU_DETECTOR)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"non-finite on 1 rank\(s\) at step 0 .*loss_classifier"):
        train_one_epoch(model, optimizer, _loader(digits[0]))
    after = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in params)
