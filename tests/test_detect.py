"""Detection transfer: config, encoder loading into the detector, BN modes, and the Ray Train job end to end
(lineage to pretraining, compare, exact resume, a NaN stop, VOC and COCO folders, `--then-detect`)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.utils.validation import _validate_metric_name
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops.misc import FrozenBatchNorm2d

from conftest import EXPERIMENTS
from mocoray.cli import main
from mocoray.config import ConfigError, load_detect_config
from mocoray.core.backbones import build_backbone
from mocoray.data import DatasetNotFoundError
from mocoray.data.detection import collate_detection, scattered_digits_det
from mocoray.detection.engine import train_one_epoch
from mocoray.detection.model import PREFIXES_ATTR
from mocoray.encoders import load_backbone, resolve_encoder
from mocoray.jobs.detect.driver import DetectionFailed, run_detection
from mocoray.jobs.detect.loop import build_model, per_class_keys
from mocoray.jobs.faults import Faults
from mocoray.tracking.compare import compare_table
from test_detection_data import write_voc
from test_linear import _official_moco_checkpoint, _trained_resnet18, digits_pretraining

DIGITS_DETECT = EXPERIMENTS / "detect_digits.yaml"
VOC_DETECT = EXPERIMENTS / "detect_voc_r50_c4.yaml"
RANDOM_SMALL = {"encoder.random_init": True, "encoder.arch": "small_resnet"}
# seconds-long runs: few small canvases, one worker unless a test needs two
TINY = {"data.train_canvases": 24, "data.val_canvases": 8, "optim.batch_size": 4, "optim.warmup": 1,
        "optim.milestones": "[]", "run.num_workers": 1, "eval.batch_size": 8}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread in this process, as the 1-CPU detection workers run (the machine has 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sets(tmp: Path, name: str, uri: str | None = None, **extra) -> list[str]:
    items = {"run.name": name, "run.storage_path": str(tmp / "runs"),
             **({"tracking.tracking_uri": uri} if uri else {"tracking.enabled": False}), **extra}
    return [f"{k}={v}" for k, v in items.items()]


# ------------------------------------------------------------------------------------ config


def test_recipes_hold_the_papers_schedule_and_norm_auto_resolves_per_hardware(capsys):
    voc = load_detect_config(VOC_DETECT, cli_values={"encoder.checkpoint": "x.pth.tar"})
    assert (voc.model.layout, voc.model.norm, voc.model.frozen_stages) == ("c4", "syncbn", 0)
    assert (voc.optim.iterations, voc.optim.batch_size, voc.optim.lr) == (24000, 16, 0.02)
    assert (voc.optim.warmup, voc.optim.milestones, voc.optim.gamma) == (100, [18000, 22000], 0.1)
    assert voc.model.min_size == list(range(480, 801, 32)) and voc.model.min_size[-1] == 800  # test size
    assert voc.data.train_sets == ["2007-trainval", "2012-trainval"] and voc.data.val_sets == ["2007-test"]
    assert voc.data.use_flip and voc.run.use_gpu and voc.run.num_workers * 2 == voc.optim.batch_size

    digits = load_detect_config(DIGITS_DETECT, cli_values=RANDOM_SMALL)
    assert digits.model.norm == "auto" and digits.model.effective_norm(digits.run) == "bn"
    assert not digits.data.use_flip  # a mirrored digit is not a digit
    gpus = load_detect_config(DIGITS_DETECT, ["run.use_gpu=true"], RANDOM_SMALL)
    assert gpus.model.effective_norm(gpus.run) == "syncbn"  # 2 GPU workers
    one_gpu = load_detect_config(DIGITS_DETECT, ["run.use_gpu=true", "run.num_workers=1"], RANDOM_SMALL)
    assert one_gpu.model.effective_norm(one_gpu.run) == "bn"
    # lengths in passes or iterations; a length given by --set replaces the recipe's other one
    assert digits.optim.total_iterations(125) == 375 and digits.optim.passes(125) == 3
    assert voc.optim.passes(1035) == 24  # the last of 24 passes is cut at iteration 24,000
    shorter = load_detect_config(DIGITS_DETECT, ["optim.iterations=60"], RANDOM_SMALL)
    assert (shorter.optim.iterations, shorter.optim.epochs, shorter.optim.milestones) == (60, None, [300])
    assert load_detect_config(VOC_DETECT, ["optim.epochs=2"], RANDOM_SMALL).optim.total_iterations(10) == 20

    # no recipe: the embedded CPU demo (experiments/detect_digits.yaml links to it)
    rc = main(["detect", "--random-init", "--arch", "small_resnet", "--print-config"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("# model.norm auto resolves to bn (run.use_gpu=False, run.num_workers=2)")
    assert "norm: auto" in out and "random_init: true" in out and "layout: fpn" in out


@pytest.mark.parametrize(("overrides", "message"), [
    (["optim.iterations=10", "optim.epochs=2"], "exactly one of optim.iterations and optim.epochs"),
    (["optim.iterations=10", "optim.warmup=10"], "optim.warmup=10 must be shorter than optim.iterations=10"),
    (["model.rcnn.rpn_topn=5"], r"model.rcnn: unknown FasterRCNN options \['rpn_topn'\]; allowed: .*box_batch"),
    (["model.norm=syncbn"], "model.norm='syncbn' needs run.use_gpu=true"),
    (["data.name=voc"], "data.name='voc' needs data.root"),
    (["data.name=coco", "data.root=x"], "needs data.val_root, data.annotations, data.val_annotations"),
    (["data.annotations=a.json"], "data.annotations not used by data.name='scattered-digits-det'"),
    (["run.channels_last=true"], "run.channels_last: not supported by the detection job"),
    (["optim.steps=[1]"], r"optim.steps: unknown field \(the lr steps are optim.milestones \(iterations\)"),
    (["model.arch=resnet50"], r"model.arch: unknown field \(the architecture is the encoder's"),
    (["model.layout=c5"], r"model.layout='c5': Input should be 'c4' or 'fpn'"),
    (["data.classes=[cat, dog, cat]"], "data.classes: class names given more than once: cat"),
    (["data.classes=[]"], r"data.classes: no class names \(list at least one\)"),
    (['data.classes=[cat, " "]'], r"data.classes: an empty class name \(position 2\)"),
    (["data.classes=[a]"], "data.classes is for data.name='voc' only: scattered-digits-det data takes its "
                           "classes from the generator"),
    (["data.name=coco", "data.root=x", "data.val_root=x", "data.annotations=a.json", "data.val_annotations=b.json",
      "data.classes=[a]"], "data.classes is for data.name='voc' only: coco data takes its classes from its "
                           "instances files' 'categories'"),
])
def test_bad_detection_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_detect_config(DIGITS_DETECT, overrides, RANDOM_SMALL)


def test_missing_dataset_paths_are_named_before_ray_starts(tmp_path):
    nowhere = tmp_path / "nowhere"
    cfg = load_detect_config(VOC_DETECT, _sets(tmp_path, "voc-missing", **{"data.root": nowhere,
                                                                         "model.norm": "bn",
                                                                         "run.use_gpu": False}),
                             RANDOM_SMALL)
    with pytest.raises(DatasetNotFoundError, match=f"data.root: {nowhere} does not exist"):
        run_detection(cfg)
    only_2007 = {"2007": {"trainval": [("000001", [("dog", 1, 1, 10, 20, False)], (40, 30))]}}
    write_voc(str(tmp_path / "voc"), only_2007)
    cfg = load_detect_config(VOC_DETECT, _sets(tmp_path, "voc-no-2012", **{"data.root": tmp_path / "voc",
                                                                         "model.norm": "bn",
                                                                         "run.use_gpu": False}),
                             RANDOM_SMALL)
    with pytest.raises(DatasetNotFoundError, match=r"data.root: no VOC2012 folder"):
        run_detection(cfg)
    assert not (tmp_path / "runs").exists()  # nothing started


def test_bad_class_lists_are_refused_before_ray_starts(tmp_path, capsys):
    write_voc(str(tmp_path / "voc"), {"2007": {"trainval": [("000001", [("dog", 1, 1, 10, 20, False)], (40, 30))]}})
    voc = {"data.root": tmp_path / "voc", "data.train_sets": "[2007-trainval]", "data.val_sets": "[2007-trainval]",
           "model.norm": "bn", "run.use_gpu": False}
    (tmp_path / "voc" / "labels.txt").write_text("dog\ncat\ndog\n")
    cfg = load_detect_config(VOC_DETECT, _sets(tmp_path, "voc-labels", **voc), RANDOM_SMALL)
    with pytest.raises(ValueError, match=r"voc/labels.txt: class names given more than once: dog"):
        run_detection(cfg)
    rc = main(["detect", str(VOC_DETECT), "--random-init", "--arch", "small_resnet",
               *[f"--set={o}" for o in _sets(tmp_path, "voc-classes", **voc, **{"data.classes": "[dog, dog]"})]])
    assert rc == 2 and "data.classes: class names given more than once: dog" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing started


# ------------------------------------------------------------------------------------ the detector


@pytest.fixture(scope="module")
def digits_pretrain(ray_session, tmp_path_factory):
    """The session's short MoCo v2 pretraining on scattered digits (1 worker, 2 epochs on 2,048 images, K 512),
    shared with test_linear.py's linear evaluations: run as `mocoray pretrain ... --then-linear-eval ...
    --then-detect` with the paper's VOC recipe shrunk to a VOC folder written there (test_linear.digits_pretraining)."""
    return digits_pretraining(tmp_path_factory)


def _detector_view(detector: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The detector's tensors under the encoder's key names (by the stage prefixes it was built with)."""
    state = detector.state_dict()
    out = {}
    for key in reference:
        enc, det = next((e, d) for e, d in getattr(detector, PREFIXES_ATTR) if key.startswith(e))
        if det + key[len(enc):] in state:
            out[key] = state[det + key[len(enc):]]
    return out


def test_detector_backbone_equals_the_encoder_for_every_source(digits_pretrain, tmp_path):
    pre, uri = digits_pretrain["result"], digits_pretrain["uri"]
    official = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    _official_moco_checkpoint(official, _trained_resnet18())
    sources = {
        "MLflow run": ({"encoder.pretrain_run": pre.mlflow_run_id}, "fpn", "bn"),
        "checkpoint dir": ({"encoder.checkpoint": pre.checkpoint}, "c4", "frozen"),
        "backbone.pt": ({"encoder.checkpoint": pre.backbone_path, "encoder.arch": "small_resnet"},
                        "fpn", "frozen"),
        "official MoCo": ({"encoder.checkpoint": str(official)}, "c4", "bn"),
    }
    for what, (values, layout, norm) in sources.items():
        cfg = load_detect_config(DIGITS_DETECT, [f"tracking.tracking_uri={uri}", f"model.layout={layout}",
                                                 f"model.norm={norm}", "model.anchor_sizes=null"], values)
        encoder = resolve_encoder(cfg.encoder, cfg.tracking)
        reference = load_backbone(encoder)[0].state_dict()  # what linear evaluation loads from the source
        detector = build_model(cfg, encoder, num_classes=10)
        got = _detector_view(detector, reference)
        counters = {k for k in reference if k.endswith("num_batches_tracked")}
        # frozen BN has no step counter; every other tensor is there, bit for bit
        assert set(got) == (set(reference) - counters if norm == "frozen" else set(reference)), what
        for key, tensor in got.items():
            assert torch.equal(tensor, reference[key]), (what, key)
    assert encoder.arch == "resnet18"


def _backbone_norms(detector: nn.Module) -> dict[str, nn.Module]:
    prefixes = [d for _, d in getattr(detector, PREFIXES_ATTR)]
    return {n: m for n, m in detector.named_modules()
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
            and any(f"{n}.".startswith(p) for p in prefixes)}


def _norm_tensors(detector: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, m in _backbone_norms(detector).items()
            for k, v in [*m.named_parameters(), *m.named_buffers()] if k != "num_batches_tracked"}


@pytest.mark.parametrize("norm", ["frozen", "bn"])
def test_frozen_norm_keeps_backbone_bn_fixed_and_bn_trains_it(norm):
    cfg = load_detect_config(DIGITS_DETECT, [f"model.norm={norm}"], RANDOM_SMALL)
    detector = build_model(cfg, resolve_encoder(cfg.encoder, cfg.tracking), num_classes=10)
    norms = _backbone_norms(detector)
    kinds = {type(m) for m in norms.values()}
    assert kinds == ({FrozenBatchNorm2d} if norm == "frozen" else {nn.BatchNorm2d}) and len(norms) >= 4
    before = _norm_tensors(detector)
    conv = detector.backbone.body.stem[0].weight.detach().clone()
    train, _ = scattered_digits_det(8, 1)
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.02, momentum=0.9)
    out = train_one_epoch(detector, optimizer, DataLoader(train, batch_size=8, collate_fn=collate_detection))
    assert out.steps == 1
    after = _norm_tensors(detector)
    assert not torch.equal(conv, detector.backbone.body.stem[0].weight)  # the backbone trains in both modes
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    if norm == "frozen":
        assert moved == []  # statistics and affine parameters as the encoder left them
    else:
        assert any(k.endswith("running_mean") for k in moved) and any(k.endswith(".weight") for k in moved)


# ------------------------------------------------------------------------------------ Ray Train runs


def test_digits_detection_from_pretraining_beats_untrained_is_linked_both_ways_and_compared(
    digits_pretrain, capsys
):
    pre, uri, tmp = digits_pretrain["result"], digits_pretrain["uri"], digits_pretrain["tmp"]
    # the recipe, shortened: 320 canvases x 2 passes (80 iterations at batch 8, 20 of warmup) on its 2 workers
    short = {"data.train_canvases": 320, "data.val_canvases": 80, "optim.epochs": 2, "optim.warmup": 20,
             "eval.at_start": True}
    rc = main(["detect", str(DIGITS_DETECT), "--pretrain-run", pre.mlflow_run_id,
               *[f"--set={o}" for o in _sets(tmp, "det-digits", uri, **short)]])
    out = capsys.readouterr().out
    assert rc == 0 and f"pretraining run {pre.mlflow_run_id}" in out

    c = mlflow.MlflowClient(uri)
    experiment = c.get_experiment_by_name(digits_pretrain["experiment"]).experiment_id  # the pretraining run's
    run = c.search_runs([experiment], "attributes.run_name = 'det-digits'")[0]
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags["mocoray.status"] == "completed"
    assert tags["mocoray.pretrain_run_id"] == pre.mlflow_run_id
    assert tags["mocoray.checkpoint"] == pre.checkpoint
    assert tags["mocoray.norm_effective"] == "bn" and tags["mocoray.world_size"] == "2"
    assert tags["mocoray.detector_checkpoint"].endswith("step_0000080")
    pretrain_run = c.get_run(pre.mlflow_run_id)
    assert pretrain_run.data.tags["mocoray.detection_run_id"] == run.info.run_id
    # the headline results copied onto the pretraining run for the MLflow UI, and the Source of each run
    assert {k: pretrain_run.data.metrics[f"transfer.{k}"] for k in ("AP", "AP50", "AP75")} == {
        k: metrics[k] for k in ("AP", "AP50", "AP75")}
    assert tags["mlflow.source.name"] == f"mocoray detect {DIGITS_DETECT.name}"
    assert f"AP **{metrics['AP']:.4f}**" in tags["mlflow.note.content"]
    assert run.info.run_id in pretrain_run.data.tags["mlflow.note.content"]
    assert run.data.params["encoder.arch"] == "small_resnet" and run.data.params["model.layout"] == "fpn"
    assert metrics["annotations.train.images"] == 320 and metrics["annotations.val.images"] == 80
    ap50 = c.get_metric_history(run.info.run_id, "AP50")
    assert [m.step for m in ap50] == [0, 1, 2]  # before training, then after each pass
    untrained, final = ap50[0].value, ap50[-1].value
    # observed with the session's encoder (2 epochs on 2,048 images): untrained 0.002, after 80 iterations 0.44
    # (1 epoch on 1,024 images: 0.41; 100 iterations with 50 of warmup: 0.52; 40 on 160 canvases: 0.06, too few)
    assert untrained < 0.05 and final > untrained + 0.1, (untrained, final)
    assert metrics["AP50"] == final and 0 < metrics["AP"] <= metrics["AP50"] and "AP75" in metrics
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1, 2]

    # the linear evaluation of the same run (chained after it, or a newer one of test_linear.py's if that ran
    # first: the newest, which its link names): compare shows both downstream results in its row
    linear = c.get_run(pretrain_run.data.tags["mocoray.linear_run_id"])
    assert linear.info.status == "FINISHED" and linear.data.tags["mocoray.pretrain_run_id"] == pre.mlflow_run_id
    row = next(r for r in compare_table(uri).rows if r["run_id"] == pre.mlflow_run_id)
    assert row["linear_top1"] == pytest.approx(linear.data.metrics["linear_top1_final"])
    assert (row["AP"], row["AP50"], row["AP75"]) == (metrics["AP"], metrics["AP50"], metrics["AP75"])
    assert main(["compare", "--tracking-uri", uri, "--experiment", digits_pretrain["experiment"]]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[-5:] == ["linear_top1", "linear_top5", "AP", "AP50", "AP75"]


def _final_state(res) -> dict:
    d = Path(res.checkpoint)
    return {name: torch.load(d / f"{name}.pt", weights_only=True)
            for name in ("model", "optimizer", "train_state")}


def test_resumed_and_restarted_detection_end_with_the_weights_of_an_uninterrupted_run(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 12 canvases at batch 4: 3 iterations a pass, 8 in all (the third pass cut at 2). The stopped run ends
    # mid-pass (iteration 4), after warmup and before the lr step at 5, so the continuation needs the data order,
    # RNG and momentum restored.
    schedule = {**TINY, "data.train_canvases": 12, "optim.iterations": 8, "optim.warmup": 2,
                "optim.milestones": "[5]", "eval.every": 2, "run.keep_checkpoints": 5, "run.max_failures": 1}

    def cfg(name: str, **extra):
        return load_detect_config(DIGITS_DETECT, _sets(tmp_path, name, uri, **schedule, **extra), RANDOM_SMALL)

    straight = run_detection(cfg("straight"))
    first = run_detection(load_detect_config(DIGITS_DETECT, _sets(tmp_path, "stopped", uri, **{
        **schedule, "optim.iterations": 4}), RANDOM_SMALL))
    assert first.metrics["global_step"] == 4 and Path(first.checkpoint).name == "step_0000004"
    with pytest.raises(DetectionFailed, match="already exists.*--resume"):
        run_detection(cfg("stopped"))
    # the continuation also loses its worker in the third pass: Ray restarts it from the checkpoint at 6
    marker = tmp_path / "crashed.txt"
    resumed = run_detection(cfg("stopped"), resume=True, faults=Faults(crash_at_epoch=2, crash_marker=str(marker)))
    assert marker.exists(), "the injected failure did not happen"

    a, b = _final_state(straight), _final_state(resumed)
    assert a["train_state"]["global_step"] == b["train_state"]["global_step"] == 8
    assert a["train_state"]["epoch"] == b["train_state"]["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6, msg=key)
    for pid, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][pid]["momentum_buffer"], st["momentum_buffer"],
                                   rtol=1e-5, atol=1e-6)
    assert resumed.metrics["AP50"] == pytest.approx(straight.metrics["AP50"], abs=1e-6)
    assert resumed.mlflow_run_id == first.mlflow_run_id  # one MLflow run, continued
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(resumed.mlflow_run_id, "global_step")
    assert sorted((m.step, m.value) for m in history) == [(1, 3), (2, 4), (2, 6), (3, 8)]
    # evaluated every second pass and at the end: at the stop (4), after pass 2 (6) and at the end (8)
    assert sorted(m.step for m in client.get_metric_history(resumed.mlflow_run_id, "AP50")) == [2, 2, 3]


def _coco_folder(root: Path) -> tuple[Path, Path]:
    """Train / val instances JSON (categories 3 and 7, a crowd box, one of an unknown category) + JPEGs."""
    (root / "images").mkdir(parents=True)
    images = []
    for i in range(6):
        Image.new("RGB", (48, 40), (40 * i, 90, 160)).save(root / "images" / f"{i}.jpg")
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 48, "height": 40})
    categories = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    train = {"images": images[:4], "categories": categories, "annotations": [
        {"id": 1, "image_id": 100, "category_id": 3, "bbox": [2, 3, 20, 15], "iscrowd": 0},
        {"id": 2, "image_id": 101, "category_id": 7, "bbox": [10, 5, 30, 30], "iscrowd": 0},
        {"id": 3, "image_id": 101, "category_id": 3, "bbox": [0, 0, 48, 40], "iscrowd": 1},
        {"id": 4, "image_id": 102, "category_id": 7, "bbox": [30, 20, 40, 40], "iscrowd": 0},  # reaches out
        {"id": 5, "image_id": 103, "category_id": 9, "bbox": [1, 1, 5, 5], "iscrowd": 0},  # unknown category
    ]}
    val = {"images": images[4:], "categories": categories, "annotations": [
        {"id": 6, "image_id": 104, "category_id": 3, "bbox": [4, 4, 20, 20], "iscrowd": 0},
        {"id": 7, "image_id": 105, "category_id": 7, "bbox": [20, 10, 20, 25], "iscrowd": 0},
    ]}
    (root / "train.json").write_text(json.dumps(train))
    (root / "val.json").write_text(json.dumps(val))
    return root / "train.json", root / "val.json"


def test_coco_folder_through_the_job_counts_its_annotations_and_a_nan_loss_stops_it(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_json, val_json = _coco_folder(tmp_path / "coco")
    data = {"data.name": "coco", "data.root": tmp_path / "coco" / "images", "data.annotations": train_json,
            "data.val_root": tmp_path / "coco" / "images", "data.val_annotations": val_json}
    # 3 training images at batch 2: 2 iterations a pass; the loss turns NaN at iteration 3, in the second
    short = {**TINY, **data, "optim.iterations": 6, "optim.batch_size": 2}
    cfg = load_detect_config(DIGITS_DETECT, _sets(tmp_path, "coco", uri, **short), RANDOM_SMALL)
    with pytest.raises(DetectionFailed, match=r"non-finite loss in pass 2 \(detection loss is non-finite on 1 "
                       r"rank\(s\) at step 3 .*optim.clip_grad_norm") as stopped:
        run_detection(cfg, faults=Faults(nan_at_step=3))
    res = stopped.value.result
    assert res.status == "nonfinite_loss" and Path(res.checkpoint).name == "step_0000002"
    good = torch.load(Path(res.checkpoint) / "model.pt", weights_only=True)  # the last good one
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())
    meta = json.loads((Path(res.checkpoint) / "meta.json").read_text())
    assert meta["classes"] == ["a", "b"] and meta["norm_effective"] == "bn"  # categories by id: 3, 7

    run = mlflow.MlflowClient(uri).get_run(res.mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.tags["mocoray.status"] == "nonfinite_loss"
    metrics = run.data.metrics
    assert {"AP", "AP50", "AP75"} <= set(metrics) and "VOC07_AP50" not in metrics  # pass 1 was evaluated
    # training: the crowd box left out, the unknown category dropped, and so the image of it left empty
    assert metrics["annotations.train.images"] == 3 and metrics["annotations.train.boxes"] == 3
    assert metrics["annotations.train.boxes_flagged_dropped"] == 1
    assert metrics["annotations.train.boxes_unknown_category"] == 1
    assert metrics["annotations.train.images_empty_dropped"] == 1
    assert metrics["annotations.train.boxes_clipped"] == 1
    assert metrics["annotations.val.images"] == 2 and metrics["annotations.val.boxes"] == 2


def test_pretrain_then_detect_on_a_voc_folder_with_the_paper_recipe_shrunk(digits_pretrain):
    pre, uri, tmp = digits_pretrain["result"], digits_pretrain["uri"], digits_pretrain["tmp"]
    assert "VOC07 AP50" in digits_pretrain["out"] and "(c4, norm bn)" in digits_pretrain["out"]
    c = mlflow.MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name(digits_pretrain["experiment"]).experiment_id],
                        f"attributes.run_name = '{digits_pretrain['name']}-detect'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["mocoray.job"] == "detection"
    assert run.data.tags["mocoray.pretrain_run_id"] == pre.mlflow_run_id
    assert digits_pretrain["detection_link"] == run.info.run_id  # the pretraining run's link, then
    assert run.data.tags["mlflow.source.name"] == f"mocoray detect {VOC_DETECT.name}"  # chained: its own recipe
    m = run.data.metrics
    assert {"VOC07_AP50", "VOC07_AP", "VOC07_AP75", "AP", "AP50", "AP75"} <= set(m)
    # training: 4 listed images, one without its annotation file, one left empty without its difficult dog
    assert m["annotations.train.images"] == 3 and m["annotations.train.images_unreadable_annotation"] == 1
    assert m["annotations.train.boxes_flagged_dropped"] == 1 and m["annotations.train.images_empty_dropped"] == 1
    assert m["annotations.train.boxes_clipped"] == 3  # each cat reaches out of its 40 x 30 image
    assert m["annotations.val.images"] == 2 and m["annotations.val.boxes"] == 2  # difficult kept (metric)
    assert run.data.params["model.layout"] == "c4" and run.data.params["model.norm_effective"] == "bn"
    assert (tmp / "runs" / f"{digits_pretrain['name']}-detect").is_dir()  # next to its pretraining run
    # no data.classes, no labels.txt: VOC's 20 classes; AP50 per class for those with an object to find
    assert "[mocoray] 20 classes from VOC's 20 classes" in digits_pretrain["out"]
    assert run.data.params["data.classes_from"].startswith("VOC's 20 classes")
    assert run.data.tags["mocoray.num_classes"] == "20"
    classes = Path(c.download_artifacts(run.info.run_id, "classes.txt", str(tmp))).read_text().splitlines()
    assert len(classes) == 20 and classes[11] == "dog"
    assert sorted(k for k in m if k.startswith("VOC07_AP50.")) == ["VOC07_AP50.dog"]  # the test cat is difficult
    assert m["VOC07_AP50"] == m["VOC07_AP50.dog"]


def test_per_class_metric_names_are_ones_mlflow_takes_and_stay_distinct():
    keys = per_class_keys("VOC07_AP50", ["traffic light", "a/b", "a_b", "c+", "../x", "straße"])
    assert keys == ["VOC07_AP50.traffic light", "VOC07_AP50.a_b_2", "VOC07_AP50.a_b_3", "VOC07_AP50.c_",
                    "VOC07_AP50._x", "VOC07_AP50.straße"]
    for key in keys:
        _validate_metric_name(key)


def _fruit_folder(voc: Path) -> None:
    """A labelImg-style VOC folder with three classes of its own, listed in a labels.txt beside Annotations/:
    four training images, two test images (apple and kiwi to find; the pear is difficult)."""
    fruit = [("apple", 3, 3, 20, 20, False), ("kiwi", 22, 8, 38, 28, False), ("pear", 10, 12, 30, 29, False)]
    trainval = [(f"t{i}", fruit, (40, 30)) for i in range(4)]
    test = [("v1", fruit[:1], (40, 30)), ("v2", [fruit[1], ("pear", 2, 2, 12, 12, True)], (40, 30))]
    write_voc(str(voc), {"2007": {"trainval": trainval, "test": test}})
    (voc / "VOCdevkit" / "VOC2007" / "labels.txt").write_text("apple\n pear\nkiwi\n\n")


def test_a_voc_folder_with_its_own_classes_trains_and_scores_ap_per_those_classes(ray_session, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fruit_folder(tmp_path / "fruit")
    data = {"data.name": "voc", "data.root": tmp_path / "fruit", "data.train_sets": "[2007-trainval]",
            "data.val_sets": "[2007-test]"}
    rc = main(["detect", str(DIGITS_DETECT), "--random-init", "--arch", "small_resnet",
               *[f"--set={o}" for o in _sets(tmp_path, "fruit", uri, **{**TINY, **data, "optim.iterations": 2,
                                                                          "optim.batch_size": 2})]])
    out = capsys.readouterr().out
    labels = tmp_path / "fruit" / "VOCdevkit" / "VOC2007" / "labels.txt"
    assert rc == 0 and f"[mocoray] 3 classes from {labels}: apple, pear, kiwi" in out
    c = mlflow.MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name("mocoray").experiment_id], "attributes.run_name = 'fruit'")[0]
    assert run.info.status == "FINISHED" and run.data.tags["mocoray.num_classes"] == "3"
    assert run.data.params["data.classes_from"] == str(labels)
    assert Path(c.download_artifacts(run.info.run_id, "classes.txt", str(tmp_path))).read_text() == \
        "apple\npear\nkiwi\n"
    # the detector's head has the three classes (+ background), and its checkpoint says which
    checkpoint = Path(run.data.tags["mocoray.detector_checkpoint"])
    head = torch.load(checkpoint / "model.pt", weights_only=True)["roi_heads.box_predictor.cls_score.weight"]
    assert head.shape[0] == 4
    assert json.loads((checkpoint / "meta.json").read_text())["classes"] == ["apple", "pear", "kiwi"]
    # AP per the given classes: each class with an object to find (not the difficult pear) has its AP50, and
    # VOC07_AP50 is their mean; the COCO-style AP is scored on the same labels
    m = run.data.metrics
    per_class = {k: v for k, v in m.items() if k.startswith("VOC07_AP50.")}
    assert sorted(per_class) == ["VOC07_AP50.apple", "VOC07_AP50.kiwi"]
    assert m["VOC07_AP50"] == pytest.approx(np.mean(list(per_class.values())))
    assert {"AP", "AP50", "AP75"} <= set(m) and m["annotations.train.images"] == 4


def test_export_in_detectron2_layout_from_the_command_line(tmp_path, capsys):
    official = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    net = _trained_resnet18()
    conv1, running_var = net.conv1.weight.detach().clone(), net.layer4[1].bn2.running_var.clone()
    _official_moco_checkpoint(official, net)
    out = tmp_path / "moco_r18.pkl"
    assert main(["export", str(official), "--format", "detectron2", str(out)]) == 0
    assert "detectron2's layout" in capsys.readouterr().out
    with out.open("rb") as f:
        payload = pickle.load(f)
    assert payload["matching_heuristics"] is True and payload["__author__"] == "mocoray"
    assert np.array_equal(payload["model"]["stem.conv1.weight"], conv1.numpy())
    assert np.array_equal(payload["model"]["res5.1.conv2.norm.running_var"], running_var.numpy())
    assert not any(k.startswith("fc") for k in payload["model"])  # the MoCo head is not backbone

    backbone = tmp_path / "small.pt"
    torch.save(build_backbone("small_resnet")[0].state_dict(), backbone)
    assert main(["export", str(backbone), "--format", "detectron2", str(tmp_path / "x.pkl")]) == 2
    assert "small_resnet has no detectron2 counterpart" in capsys.readouterr().err
    assert main(["export", str(official), str(tmp_path / "plain.pt")]) == 0  # the default stays torchvision's
    assert "conv1.weight" in torch.load(tmp_path / "plain.pt", weights_only=True)
