"""Linear evaluation as a Ray Train job: `run_linear_eval` (driver) and `train_loop_per_worker` (workers).

Driver: resolve the encoder (`encoders.py`), load it once to fail early, open the MLflow run with its
lineage tags, fit a TorchTrainer, close the run.
Worker: frozen backbone (eval mode, requires_grad False; a random-init one first gets BN statistics
recomputed on training images) + a new fc layer, optionally after an affine-free BatchNorm of the features
(`linear.feature_norm`; the only trained module, DDP across workers) -> epochs of `train_one_epoch` on
augmented / centre-crop views or on cached centre-crop features -> `evaluate` (top-1 / top-5 on the
validation split) -> a bit-identical check of every backbone tensor (parameters and BN statistics) after
every epoch; any change fails the run.

Protocols (`linear.mode`): `augmented` is the paper's (RandomResizedCrop + flip for training, resize +
centre crop for validation); `center` trains on the centre-crop views instead; `cached` extracts the
centre-crop features once and trains the fc layer on them. `cached` computes the same thing as `center`
(same views, same batches, same fc initialisation; only floating-point rounding differs: exact on CPU,
close on GPUs where TF32 / cuDNN algorithms depend on the batch) but not the same thing as `augmented`,
whose crops change every epoch.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .. import __version__
from ..checkpoints import load_training_checkpoint, save_training_checkpoint
from ..config import LinearConfig, load_linear_config
from ..core.amp import autocast
from ..core.augment import AugmentSpec, BatchAugment, normalize_batch
from ..core.distributed import all_reduce_sum, rank_world
from ..core.features import extract_features
from ..core.schedule import lr_at
from ..data import image_batches, labelled_splits, take
from ..data.base import Resized, SkipCorrupt, TensorImages, Transformed, collate_batch, to_uint8_tensor
from ..data.fingerprint import dataset_records
from ..encoders import EncoderSource, load_backbone, resolve_encoder
from ..logreg import fit_logreg
from ..registry import tag_versions_with_results
from ..table import render_table
from ..tracking import (
    STATUS_TAG,
    MetricLogger,
    safely,
)
from ..tracking_artifacts import log_environment
from . import interrupts, runtime
from .calibration import recompute_bn_on_images
from .downstream import downstream_trainer, link_back, open_downstream_run, run_guarded
from .faults import Faults
from .preflight import check_linear_inputs

LINEAR_RUN_TAG = "mocoray.linear_run_id"  # set on the pretraining run: its newest linear evaluation
FC_CHECKPOINT_TAG = "mocoray.fc_checkpoint"  # the linear run's own checkpoint (the trained fc layer)


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or BN statistics moved during linear evaluation."""


class LinearEvalFailed(RuntimeError):
    """The linear evaluation did not complete; `result` holds what it left behind, if anything."""

    exit_code = 1  # 130 / 143 when a signal stopped it

    def __init__(self, message: str, result: LinearResult | None = None) -> None:
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------------------------------------------
# The frozen backbone


def build_frozen_backbone(encoder: EncoderSource, seed: int = 0) -> tuple[nn.Module, int]:
    """The encoder's backbone, frozen: eval mode (BN uses its running statistics and never updates them)
    and requires_grad False."""
    backbone, feat_dim = load_backbone(encoder, seed)
    backbone.requires_grad_(False)
    backbone.eval()
    return backbone, feat_dim


def backbone_snapshot(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter and buffer (BN running statistics included)."""
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def assert_backbone_unchanged(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """Raise BackboneChangedError unless every tensor is bit-identical to `reference`."""
    current = backbone.state_dict()
    changed = [k for k, v in reference.items() if k not in current or not torch.equal(current[k].detach(), v)]
    if changed:
        raise BackboneChangedError(
            f"the frozen backbone changed during linear evaluation: {len(changed)} of {len(reference)} tensors "
            f"differ (first: {', '.join(changed[:4])}). The protocol requires eval mode and no gradients "
            "for the backbone; its result is not a linear evaluation."
        )


class LinearHead(nn.Module):
    """What the linear protocol trains: an fc layer, after an affine-free BatchNorm of the features with
    `feature_norm="batchnorm"` (it only standardises them, so the fc's lr stops depending on the encoder's
    feature scale; it has no weights, so the classifier stays linear in the features at evaluation)."""

    def __init__(self, feat_dim: int, num_classes: int, feature_norm: str = "none") -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(feat_dim, affine=False) if feature_norm == "batchnorm" else nn.Identity()
        self.fc = nn.Linear(feat_dim, num_classes)
        self.fc.weight.data.normal_(mean=0.0, std=0.01)
        self.fc.bias.data.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(features))


# ---------------------------------------------------------------------------------------------------
# Views of the labelled images


class CenterCrop(Dataset):
    """`(uint8 3 x size x size, label)`: shorter side resized to `resize`, then the central size x size."""

    def __init__(self, base: Dataset, size: int, resize: int) -> None:
        self.base, self.size, self.resize = base, size, resize

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.base[i]
        t = to_uint8_tensor(img, self.resize)
        top = (t.shape[-2] - self.size) // 2
        left = (t.shape[-1] - self.size) // 2
        return t[:, top : top + self.size, left : left + self.size].contiguous(), label


def center_views(dataset: Dataset, size: int, resize: int | None) -> Dataset:
    """The deterministic evaluation view of every image (in-memory sets are converted once)."""
    resize = resize or size
    if isinstance(dataset, TensorImages):
        if dataset.images.shape[-1] == size == resize and dataset.images.shape[-2] == size:
            return dataset
        view = CenterCrop(dataset, size, resize)
        images = torch.stack([view[i][0] for i in range(len(view))])
        return TensorImages(images, dataset.labels, dataset.num_classes)
    return CenterCrop(dataset, size, resize)


def _loader(dataset: Dataset, batch_size: int, sampler, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_batch, pin_memory=pin, persistent_workers=workers > 0)


def _as_loader_items(dataset: Dataset, size: int) -> Dataset:
    """Items the DataLoader + collate_batch understand: TensorImages as is, others as resized uint8 tensors."""
    return dataset if isinstance(dataset, TensorImages) else Resized(SkipCorrupt(dataset), size)


def _augment_spec(cfg: LinearConfig) -> AugmentSpec:
    return AugmentSpec(cfg.data.image_size, crop_scale=(cfg.linear.crop_min_scale, 1.0), jitter=(0.0, 0.0, 0.0, 0.0),
                       jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.5 if cfg.linear.flip else 0.0)


def train_transform(cfg: LinearConfig):
    """The augmented protocol's per-image torchvision transform: RandomResizedCrop + flip + normalise."""
    from torchvision import transforms as T

    spec = _augment_spec(cfg)
    ops = [T.RandomResizedCrop(spec.size, scale=spec.crop_scale)]
    if cfg.linear.flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose([*ops, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def _training_views(cfg: LinearConfig, train_raw: Dataset, train_center: Dataset | None
                    ) -> tuple[Dataset, BatchAugment | None]:
    """What the train loader serves in the center / augmented protocols, and the batched augmentation
    to apply to it on the device (in-memory images) if the loader does not augment itself."""
    if cfg.linear.mode == "center":
        return _as_loader_items(train_center, cfg.data.image_size), None  # type: ignore[arg-type]
    if isinstance(train_raw, TensorImages) and cfg.data.augment == "device":
        return train_raw, BatchAugment(_augment_spec(cfg))
    return Transformed(SkipCorrupt(train_raw), train_transform(cfg)), None


def topk_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1, top-5) correct counts; top-5 is top-C when there are fewer than 5 classes."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels.view(-1, 1)
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


# ---------------------------------------------------------------------------------------------------
# Where the fc layer's inputs come from: cached features, or images through the frozen backbone


class CachedFeatures:
    """Centre-crop features of the train and val images, extracted once (the `cached` protocol)."""

    def __init__(self, backbone: nn.Module, train: Dataset, val: Dataset, cfg: LinearConfig, device: torch.device):
        size = cfg.data.image_size

        def features(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
            return extract_features(
                backbone, len(dataset),  # type: ignore[arg-type]
                lambda idx: image_batches(dataset, idx, cfg.linear.eval_batch_size, size, cfg.data.loader_workers),
                device, size, cfg.run.channels_last,
            )

        with autocast(device.type, cfg.run.amp):
            self.train_f, self.train_y = features(train)
            self.val_f, self.val_y = features(val)
        self.num_train = self.train_f.shape[0]

    def train_batches(self, sampler: DistributedSampler, per_worker: int):
        order = torch.as_tensor(list(iter(sampler)), device=self.train_f.device)
        for i in range(0, len(order), per_worker):
            idx = order[i : i + per_worker]
            yield self.train_f[idx], self.train_y[idx]

    def val_batches(self):
        """Every rank evaluates all of val (no counts to sum)."""
        yield self.val_f, self.val_y


class StreamedFeatures:
    """Images through the frozen backbone at every step (the `augmented` and `center` protocols)."""

    def __init__(self, backbone: nn.Module, train_raw: Dataset, train_center: Dataset | None, val_center: Dataset,
                 cfg: LinearConfig, device: torch.device, sampler: DistributedSampler, unfrozen: bool) -> None:
        self.backbone, self.cfg, self.device, self.unfrozen = backbone, cfg, device, unfrozen
        rank, world = rank_world()
        pin, workers, size = device.type == "cuda", cfg.data.loader_workers, cfg.data.image_size
        train_items, self.augment = _training_views(cfg, train_raw, train_center)
        self.num_train = len(train_items)  # type: ignore[arg-type]
        mine = list(range(rank, len(val_center), world))  # type: ignore[arg-type]
        val_part = val_center.subset(mine) if isinstance(val_center, TensorImages) else Subset(val_center, mine)
        self.val_loader = _loader(_as_loader_items(val_part, size), cfg.linear.eval_batch_size, None, workers, pin)
        self.train_loader = _loader(train_items, cfg.optim.batch_size // world, sampler, workers, pin)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(self.unfrozen), autocast(self.device.type, self.cfg.run.amp):
            return self.backbone(x).float()  # the fc layer always trains in float32

    def train_batches(self, sampler: DistributedSampler, per_worker: int):
        for x, y, _ in self.train_loader:
            x = x.to(self.device, non_blocking=True)
            if self.augment is not None:
                x = self.augment(x)
            elif x.dtype == torch.uint8:
                x = normalize_batch(x, size=self.cfg.data.image_size)
            yield self._features(x), y.to(self.device, non_blocking=True)

    def val_batches(self):
        for x, y, _ in self.val_loader:
            x = normalize_batch(x.to(self.device, non_blocking=True), size=self.cfg.data.image_size)
            yield self._features(x), y.to(self.device)


# ---------------------------------------------------------------------------------------------------
# Worker: one epoch, evaluation, the loop


def train_one_epoch(classifier: nn.Module, optimizer: torch.optim.Optimizer, batches, cfg: LinearConfig,
                    epoch: int, steps_per_epoch: int, device: torch.device) -> dict[str, float]:
    classifier.train()
    t0 = time.perf_counter()
    loss_sum = correct = seen = 0.0
    cur_lr = cfg.optim.lr
    for i, (feats, y) in enumerate(batches):
        cur_lr = lr_at(epoch + i / steps_per_epoch, cfg.optim.lr, cfg.optim.epochs, cfg.optim.schedule, 0,
                       cfg.optim.milestones, cfg.optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        logits = classifier(feats)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(dim=1) == y).sum().item()
        seen += len(y)
    train_time = time.perf_counter() - t0
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], device)
    return {"loss": loss_sum / seen, "train_top1": correct / seen, "lr": cur_lr, "images_per_s": seen / train_time}


@torch.no_grad()
def evaluate(classifier: nn.Module, batches, device: torch.device, sharded: bool) -> tuple[float, float]:
    """(top-1, top-5) on the validation batches; `sharded`: each rank saw its share, so counts are summed."""
    classifier.eval()
    counts = [0.0, 0.0, 0.0]
    for feats, y in batches:
        c1, c5 = topk_correct(classifier(feats), y)
        counts = [counts[0] + c1, counts[1] + c5, counts[2] + len(y)]
    c1, c5, n = all_reduce_sum(counts, device) if sharded else counts
    return c1 / n, c5 / n


def report_with_checkpoint(head: nn.Module, optimizer: torch.optim.Optimizer | None, metrics: dict,
                           cfg: LinearConfig, loop_config: dict, rank: int, world: int) -> None:
    """Report `metrics` to Ray with a checkpoint of the linear head (rank 0 writes it)."""
    import ray.train

    epoch_no = metrics["epoch"]
    with tempfile.TemporaryDirectory() as tmp:
        save_training_checkpoint(
            tmp,
            rank=rank,
            model_state=head.state_dict() if rank == 0 else None,
            optimizer_state=optimizer.state_dict() if rank == 0 and optimizer is not None else None,
            scaler_state=None,
            train_state={"epoch": epoch_no, "linear_top1": metrics["linear_top1"],
                         "linear_top5": metrics["linear_top5"]},
            meta={"config": cfg.model_dump(mode="json"), "encoder": loop_config["encoder"], "metrics": metrics,
                  "world_size": world, "mocoray": __version__, "torch": torch.__version__},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{epoch_no:04d}")


def logreg_protocol(source: CachedFeatures, head: LinearHead, cfg: LinearConfig, loop_config: dict,
                    logger: MetricLogger | None, rank: int, world: int, device: torch.device) -> None:
    """`linear.mode=logreg`: one scikit-learn fit on rank 0, stored as the fc layer; no epochs."""
    t0 = time.perf_counter()
    top = [0.0, 0.0]
    fc = head.fc
    if rank == 0:
        res = fit_logreg(source.train_f, source.train_y, source.val_f, source.val_y, cfg.run.seed)
        fc.weight.data.copy_(res.weight[: fc.out_features])
        fc.bias.data.copy_(res.bias[: fc.out_features])
        top = [res.top1, res.top5]
    top1, top5 = all_reduce_sum(top, device)  # the other ranks only need the numbers for their report
    metrics = {"epoch": 1, "linear_top1": top1, "linear_top5": top5, "epoch_time_s": time.perf_counter() - t0}
    if logger:
        logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=1)
        runtime.console(f"logistic regression on standardised features: val top-1 {top1:.4f}  top-5 {top5:.4f}  "
                        f"({metrics['epoch_time_s']:.1f}s)")
    report_with_checkpoint(head, None, metrics, cfg, loop_config, rank, world)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": 1,
                                                          "linear_top1": top1, "linear_top5": top5})


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = LinearConfig.model_validate(loop_config["cfg"])
    encoder = EncoderSource(**loop_config["encoder"])
    unfrozen = Faults(**loop_config["faults"]).unfreeze_backbone
    runtime.quiet_ray_worker_logs()
    rank, world = rank_world()
    device = runtime.worker_device(cfg.run)

    train_raw, val_raw, num_classes = labelled_splits(cfg.data)
    train_raw = take(train_raw, cfg.data.max_images)
    size, mode = cfg.data.image_size, cfg.linear.mode
    train_center = center_views(train_raw, size, cfg.linear.val_resize) if mode != "augmented" else None
    val_center = center_views(val_raw, size, cfg.linear.val_resize)

    backbone, feat_dim = build_frozen_backbone(encoder, cfg.run.seed)
    backbone.to(device)
    if cfg.run.channels_last:
        backbone.to(memory_format=torch.channels_last)
    if encoder.source is None:  # a random-init baseline, made fair (see recompute_bn_on_images)
        images = train_center if train_center is not None else center_views(train_raw, size, cfg.linear.val_resize)
        recompute_bn_on_images(backbone, images, size, device, cfg.run.channels_last, cfg.data.loader_workers)
    reference = backbone_snapshot(backbone)
    if unfrozen:
        backbone.requires_grad_(True)
        backbone.train()

    torch.manual_seed(cfg.run.seed)  # the same fc on every rank and in every protocol
    head = LinearHead(feat_dim, num_classes, cfg.linear.feature_norm).to(device)
    params = list(head.parameters()) + (list(backbone.parameters()) if unfrozen else [])
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.sgd_momentum,
                                weight_decay=cfg.optim.weight_decay)

    start_epoch, top1, top5 = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = load_training_checkpoint(ckpt_dir, rank)
        head.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        progress = saved["train_state"]
        start_epoch, top1, top5 = int(progress["epoch"]), progress.get("linear_top1"), progress.get("linear_top5")
        if rank == 0:
            runtime.console(f"resumed the linear evaluation after epoch {start_epoch}")
    classifier = ray.train.torch.prepare_model(head, move_to_device=False) if world > 1 else head

    t0 = time.perf_counter()
    if mode in ("cached", "logreg"):
        source: CachedFeatures | StreamedFeatures = CachedFeatures(backbone, train_center, val_center, cfg, device)
        sampler = DistributedSampler(range(source.num_train), num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.run.seed)
    else:
        sampler = DistributedSampler(range(len(train_raw)), num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg.run.seed)
        source = StreamedFeatures(backbone, train_raw, train_center, val_center, cfg, device, sampler, unfrozen)
    extract_s = time.perf_counter() - t0
    per_worker = cfg.optim.batch_size // world
    steps_per_epoch = -(-sampler.num_samples // per_worker)
    sharded_val = isinstance(source, StreamedFeatures)

    logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")) if rank == 0 else None
    if rank == 0:
        log_environment(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"), world, device)
    if mode == "logreg":
        logreg_protocol(source, head, cfg, loop_config, logger, rank, world, device)  # type: ignore[arg-type]
        return
    if rank == 0:
        runtime.console(f"linear eval ({mode}) of {encoder.label}: {encoder.arch}, {feat_dim}-d features, {num_classes} classes, "
                f"{source.num_train} train / {len(val_center)} val images, {world} worker(s), "
                f"{steps_per_epoch} steps/epoch" + (f"; features cached in {extract_s:.1f}s" if mode in ("cached", "logreg") else ""))

    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        train = train_one_epoch(classifier, optimizer, source.train_batches(sampler, per_worker), cfg, epoch,
                                steps_per_epoch, device)
        epoch_no = epoch + 1
        last = epoch_no == cfg.optim.epochs
        evaluated = epoch_no % cfg.linear.eval_every == 0 or last
        if evaluated:
            top1, top5 = evaluate(classifier, source.val_batches(), device, sharded_val)
        try:
            assert_backbone_unchanged(backbone, reference)
        except BackboneChangedError as err:
            if rank == 0:
                runtime.write_status(loop_config["status_url"], {"status": "backbone_changed", "epoch": epoch_no,
                                                          "message": str(err)})
                if logger:
                    logger.tags({STATUS_TAG: "backbone_changed"})
            raise
        metrics = {"epoch": epoch_no, **train, "linear_top1": top1, "linear_top5": top5,
                   "epoch_time_s": time.perf_counter() - t0}
        if logger:
            logger.metrics({k: v for k, v in metrics.items()
                            if k != "epoch" and (evaluated or not k.startswith("linear_"))}, step=epoch_no)
            val = f"val top-1 {top1:.4f}  top-5 {top5:.4f}" if top1 is not None else "val not yet evaluated"
            runtime.console(f"epoch {epoch_no}/{cfg.optim.epochs}  loss {train['loss']:.4f}  train top-1 "
                    f"{train['train_top1']:.4f}  {val}  lr {train['lr']:.4g}  {metrics['epoch_time_s']:.1f}s")
        # Ray gets a report (a barrier, ~1-2 s in Train V2) only with a checkpoint: a cached-feature epoch
        # takes milliseconds, and MLflow already has every epoch's metrics.
        if epoch_no % cfg.run.checkpoint_every == 0 or last:
            report_with_checkpoint(head, optimizer, metrics, cfg, loop_config, rank, world)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": cfg.optim.epochs,
                                                          "linear_top1": top1, "linear_top5": top5})


# ---------------------------------------------------------------------------------------------------
# Driver


@dataclass
class LinearResult:
    run_dir: str
    checkpoint: str | None  # this run's last checkpoint (the trained fc layer)
    metrics: dict[str, Any]
    status: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    encoder: EncoderSource


def _open_mlflow_run(cfg: LinearConfig, encoder: EncoderSource, run_dir: str, uri: str) -> str:
    return open_downstream_run(uri, cfg, encoder, run_dir, "linear", f"Linear evaluation ({cfg.linear.mode})",
                               tags={"mocoray.linear_mode": cfg.linear.mode})


def run_linear_eval(cfg: LinearConfig, address: str | None = None, resume: bool = False,
                    faults: Faults | None = None) -> LinearResult:
    """Run one linear evaluation; returns where its results are (raises LinearEvalFailed otherwise).

    `faults` injects failures (tests only).
    """
    faults = faults or Faults()
    if faults.unfreeze_backbone and cfg.linear.mode == "cached":
        raise ValueError("unfreeze_backbone needs linear.mode augmented or center (cached features never pass "
                         "gradients to the backbone)")
    encoder = resolve_encoder(cfg.encoder, cfg.tracking)
    build_frozen_backbone(encoder, cfg.run.seed)  # load once here: a bad file fails before Ray starts
    for warning in check_linear_inputs(cfg):
        print(f"[mocoray] warning: {warning}", file=sys.stderr)
    return run_guarded(cfg.run, resume, address, LinearEvalFailed, lambda job: _fit(job, cfg, encoder, faults, resume))


def _fit(job: runtime.JobRun, cfg: LinearConfig, encoder: EncoderSource, faults: Faults, resume: bool
         ) -> LinearResult:
    trainer = downstream_trainer(job, cfg, encoder, faults, _open_mlflow_run, lambda: dataset_records(cfg.data),
                                 train_loop_per_worker)
    try:
        result = interrupts.fit(trainer)
        error = None
    except Exception as err:
        result, error = None, err
    status = job.status() or {"status": "failed"}
    if error is not None or status["status"] != "completed":
        job.end_tracking("FAILED", {STATUS_TAG: status["status"]})
        job.free_name_unless_checkpointed(resume)
        reason = status.get("message") or str(error)
        raise LinearEvalFailed(f"linear evaluation {cfg.run.name!r} failed ({status['status']}): {reason}")

    checkpoint = runtime.checkpoint_url(result, job.storage_path)
    if job.mlflow_run_id:
        final = {"linear_top1_final": status["linear_top1"], "linear_top5_final": status["linear_top5"]}
        MetricLogger(job.tracking_uri, job.mlflow_run_id).metrics(final, step=status["epoch"])
        link_back(job, encoder, LINEAR_RUN_TAG)
    tags = {STATUS_TAG: "completed"}
    if checkpoint:
        tags[FC_CHECKPOINT_TAG] = checkpoint
    job.end_tracking("FINISHED", tags)
    if job.mlflow_run_id and encoder.pretrain_run_id:  # registered versions of the encoder show the new result
        safely("tagging registered versions", tag_versions_with_results, job.tracking_uri, encoder.pretrain_run_id)
    return LinearResult(run_dir=job.run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                        status=status["status"], mlflow_run_id=job.mlflow_run_id, tracking_uri=job.tracking_uri,
                        encoder=encoder)


def linear_eval_best(result, sweep, n: int, recipe: str | None, overrides: list[str] | None = None,
                     address: str | None = None) -> list[dict[str, Any]]:
    """Linear evaluation of the best `n` completed trials of a finished sweep (`result`: its SweepResult,
    `sweep`: its SweepConfig); one linear run per trial, linked to its trial's MLflow run (so `compare`
    joins them); without tracking it reads the trial's last checkpoint directly."""
    import fsspec

    col = f"best_{sweep.metric}"
    sign = 1.0 if sweep.mode == "max" else -1.0
    ranked = sorted((r for r in result.trials if r["status"] == "completed" and r[col] is not None),
                    key=lambda r: -sign * r[col])[:n]
    out = []
    for row in ranked:
        values: dict[str, Any] = {"run.name": row["run_dir"].rstrip("/").rsplit("/", 1)[1] + "-linear"}
        if row.get("mlflow_run_id"):
            values.update({"encoder.pretrain_run": row["mlflow_run_id"], "tracking.tracking_uri": result.tracking_uri})
        else:
            fs, run_path = fsspec.core.url_to_fs(row["run_dir"])
            checkpoints = sorted(fs.glob(run_path + "/epoch_*"))
            if not checkpoints:
                print(f"[mocoray] trial {row['trial_id']}: no checkpoint to evaluate")
                continue
            last = checkpoints[-1] if "://" not in row["run_dir"] else fs.unstrip_protocol(checkpoints[-1])
            values.update({"encoder.checkpoint": last, "tracking.enabled": False})
        cfg = load_linear_config(recipe, overrides, values)
        try:
            res = run_linear_eval(cfg, address=address)
        except (LinearEvalFailed, LookupError, ValueError) as err:
            print(f"[mocoray] linear evaluation of trial {row['trial_id']} failed: {err}")
            out.append({"trial_id": row["trial_id"], "status": "failed", "error": str(err)})
            continue
        out.append({"trial_id": row["trial_id"], "status": res.status, "mlflow_run_id": res.mlflow_run_id,
                    **{k: res.metrics.get(k) for k in ("linear_top1", "linear_top5")}})
    if out:
        print("\n" + render_table(out, ["trial_id", "linear_top1", "linear_top5", "status"],
                                  cell=lambda _c, v: f"{v:.4g}" if isinstance(v, float) else str(v), missing="-"))
    return out
