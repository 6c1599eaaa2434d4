"""Linear evaluation as a Ray Train job: `run_linear_eval` (driver) and `train_loop_per_worker` (workers).

Driver: resolve the encoder (MLflow pretraining run -> its final checkpoint, a checkpoint path/URL, an
exported or official MoCo file, or random init), load it once to fail early, open the MLflow run with
its lineage tags, fit a TorchTrainer, close the run.
Worker: frozen backbone (eval mode, requires_grad False) + a new fc layer (the only trained module,
DDP across workers) -> epochs of SGD on augmented / centre-crop views or on cached centre-crop
features -> top-1 / top-5 on the validation split -> a bit-identical check of every backbone tensor
(parameters and BN statistics) after every epoch; any change fails the run.

Protocols (`linear.mode`): `augmented` is the paper's (RandomResizedCrop + flip for training,
resize + centre crop for validation); `center` trains on the centre-crop views instead; `cached`
extracts the centre-crop features once and trains the fc layer on them. `cached` computes the same
thing as `center` (same views, same batches, same fc initialisation; only floating-point rounding
differs: exact on CPU, close on GPUs where TF32 / cuDNN algorithms depend on the batch) but not the
same thing as `augmented`, whose crops change every epoch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .. import __version__
from ..checkpoints import (
    load_backbone_state_dict,
    load_training_checkpoint,
    read_meta,
    save_training_checkpoint,
)
from ..config import flatten
from ..core.augment import AugmentSpec, BatchAugment, normalize_batch
from ..core.backbones import build_backbone
from ..data import labelled_splits
from ..data.base import Resized, SkipCorrupt, TensorImages, Transformed, collate_batch, to_uint8_tensor
from ..linear_config import LinearConfig
from ..tracking import (
    CHECKPOINT_TAG,
    JOB_TAG,
    PRETRAIN_RUN_TAG,
    STATUS_TAG,
    MetricLogger,
    end_run,
    find_run_by_tag,
    resolve_tracking_uri,
    run_lineage,
    start_run,
)
from .common import (
    absolute_storage,
    checkpoint_url,
    console,
    extract_features,
    init_ray,
    lr_at,
    make_torch_trainer,
    prepare_run_dir,
    quiet_ray_worker_logs,
    rank_world,
    read_status,
    write_status,
)

log = logging.getLogger(__name__)
LINEAR_RUN_TAG = "mocoray.linear_run_id"  # set on the pretraining run: its newest linear evaluation
FC_CHECKPOINT_TAG = "mocoray.fc_checkpoint"  # the linear run's own checkpoint (the trained fc layer)
RANDOM_INIT = "random-init"


class BackboneChangedError(RuntimeError):
    """The frozen backbone's weights or BN statistics moved during linear evaluation."""


class LinearEvalFailed(RuntimeError):
    """The linear evaluation did not complete; `result` holds what it left behind, if anything."""

    def __init__(self, message: str, result: LinearResult | None = None) -> None:
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------------------------------------------
# The encoder


@dataclass
class EncoderSource:
    """A resolved encoder: where its weights are (None = random init) and how to rebuild its module."""

    source: str | None
    arch: str
    cifar_stem: bool
    pretrain_run_id: str | None = None
    pretrain_experiment: str | None = None

    @property
    def label(self) -> str:
        return self.source or RANDOM_INIT


def build_frozen_backbone(encoder: EncoderSource, seed: int = 0) -> tuple[nn.Module, int]:
    """The backbone with the encoder's weights (strictly: every tensor present, none left over), frozen.

    Frozen = eval mode (BN uses its running statistics and never updates them) and requires_grad False.
    A random-init backbone is drawn from `seed`, so every worker builds the same one.
    """
    torch.manual_seed(seed)
    backbone, feat_dim = build_backbone(encoder.arch, encoder.cifar_stem)
    if encoder.source is not None:
        state = load_backbone_state_dict(encoder.source)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{encoder.source} does not fit a {encoder.arch} backbone (cifar_stem={encoder.cifar_stem}): "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; set encoder.arch / "
                "encoder.cifar_stem to the architecture it was trained with"
            )
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


def _take(dataset: Dataset, n: int | None) -> Dataset:
    if n is None or len(dataset) <= n:  # type: ignore[arg-type]
        return dataset
    return dataset.subset(range(n)) if isinstance(dataset, TensorImages) else Subset(dataset, range(n))


def _loader(dataset: Dataset, batch_size: int, sampler, workers: int, pin: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_batch, pin_memory=pin, persistent_workers=workers > 0)


def _as_loader_items(dataset: Dataset, size: int) -> Dataset:
    """Items the DataLoader + collate_batch understand: TensorImages as is, others as resized uint8 tensors."""
    return dataset if isinstance(dataset, TensorImages) else Resized(SkipCorrupt(dataset), size)


def train_transform(cfg: LinearConfig):
    """The augmented protocol's per-image torchvision transform: RandomResizedCrop + flip + normalise."""
    from torchvision import transforms as T

    spec = _augment_spec(cfg)
    ops = [T.RandomResizedCrop(spec.size, scale=spec.crop_scale)]
    if cfg.linear.flip:
        ops.append(T.RandomHorizontalFlip())
    return T.Compose([*ops, T.ToTensor(), T.Normalize(spec.mean, spec.std)])


def _augment_spec(cfg: LinearConfig) -> AugmentSpec:
    return AugmentSpec(cfg.data.image_size, crop_scale=(cfg.linear.crop_min_scale, 1.0), jitter=(0.0, 0.0, 0.0, 0.0),
                       jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.5 if cfg.linear.flip else 0.0)


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


def _all_reduce_counts(counts: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(counts, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# Worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = LinearConfig.model_validate(loop_config["cfg"])
    encoder = EncoderSource(**loop_config["encoder"])
    quiet_ray_worker_logs()
    rank, world = rank_world()
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    torch.set_num_threads(cfg.run.torch_threads or max(1, int(cfg.run.cpus_per_worker)))
    pin = device.type == "cuda"

    train_raw, val_raw, num_classes = labelled_splits(cfg.data)
    train_raw = _take(train_raw, cfg.data.max_images)
    size, mode = cfg.data.image_size, cfg.linear.mode
    train_center = center_views(train_raw, size, cfg.linear.val_resize) if mode != "augmented" else None
    val_center = center_views(val_raw, size, cfg.linear.val_resize)

    backbone, feat_dim = build_frozen_backbone(encoder, cfg.run.seed)
    backbone.to(device)
    if cfg.run.channels_last:
        backbone.to(memory_format=torch.channels_last)
    reference = backbone_snapshot(backbone)
    unfrozen = cfg.debug.unfreeze_backbone
    if unfrozen:
        backbone.requires_grad_(True)
        backbone.train()

    torch.manual_seed(cfg.run.seed)  # the same fc on every rank and in every protocol
    fc = nn.Linear(feat_dim, num_classes)
    fc.weight.data.normal_(mean=0.0, std=0.01)
    fc.bias.data.zero_()
    fc.to(device)
    params = list(fc.parameters()) + (list(backbone.parameters()) if unfrozen else [])
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.sgd_momentum,
                                weight_decay=cfg.optim.weight_decay)

    start_epoch, top1, top5 = 0, None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_training_checkpoint(ckpt_dir, rank)
        fc.load_state_dict({k.removeprefix("fc."): v for k, v in state["model"].items()})
        optimizer.load_state_dict(state["optimizer"])
        ts = state["train_state"]
        start_epoch, top1, top5 = int(ts["epoch"]), ts.get("linear_top1"), ts.get("linear_top5")
        if rank == 0:
            console(f"resumed the linear evaluation after epoch {start_epoch}")
    classifier = ray.train.torch.prepare_model(fc, move_to_device=False) if world > 1 else fc

    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.run.amp]

    def autocast():  # the backbone's forward only: the fc layer always trains in float32
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    def features(x: torch.Tensor) -> torch.Tensor:
        if cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(unfrozen), autocast():
            return backbone(x).float()

    feature_kw = dict(device=device, image_size=size, batch_size=cfg.linear.eval_batch_size,
                      channels_last=cfg.run.channels_last, loader_workers=cfg.data.loader_workers)
    extract_s = 0.0
    if mode == "cached":
        t0 = time.perf_counter()
        with autocast():
            train_f, train_y = extract_features(backbone, train_center, **feature_kw)
            val_f, val_y = extract_features(backbone, val_center, **feature_kw)
        extract_s = time.perf_counter() - t0
        n_train = train_f.shape[0]
    else:
        train_items, augment = _training_views(cfg, train_raw, train_center)
        n_train = len(train_items)  # type: ignore[arg-type]
        mine = list(range(rank, len(val_center), world))  # type: ignore[arg-type]
        val_part = val_center.subset(mine) if isinstance(val_center, TensorImages) else Subset(val_center, mine)
        val_loader = _loader(_as_loader_items(val_part, size), cfg.linear.eval_batch_size, None,
                             cfg.data.loader_workers, pin)

    per_worker = cfg.optim.batch_size // world
    sampler = DistributedSampler(range(n_train), num_replicas=world, rank=rank, shuffle=True, seed=cfg.run.seed)
    if mode != "cached":
        train_loader = _loader(train_items, per_worker, sampler, cfg.data.loader_workers, pin)
    steps_per_epoch = -(-sampler.num_samples // per_worker)

    def train_batches():
        if mode == "cached":
            order = torch.as_tensor(list(iter(sampler)), device=device)
            for i in range(0, len(order), per_worker):
                idx = order[i : i + per_worker]
                yield train_f[idx], train_y[idx]
            return
        for x, y, _ in train_loader:
            x = x.to(device, non_blocking=True)
            if augment is not None:
                x = augment(x)
            elif x.dtype == torch.uint8:
                x = normalize_batch(x, size=size)
            yield features(x), y.to(device, non_blocking=True)

    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        classifier.eval()
        if mode == "cached":
            c1, c5 = topk_correct(classifier(val_f), val_y)
            return c1 / len(val_y), c5 / len(val_y)
        counts = [0.0, 0.0, 0.0]
        for x, y, _ in val_loader:
            logits = classifier(features(normalize_batch(x.to(device, non_blocking=True), size=size)))
            c1, c5 = topk_correct(logits, y.to(device))
            counts = [counts[0] + c1, counts[1] + c5, counts[2] + len(y)]
        c1, c5, n = _all_reduce_counts(counts, device)
        return c1 / n, c5 / n

    logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id")) if rank == 0 else None
    if rank == 0:
        console(f"linear eval ({mode}) of {encoder.label}: {encoder.arch}, {feat_dim}-d features, {num_classes} classes, "
                f"{n_train} train / {len(val_center)} val images, {world} worker(s), {steps_per_epoch} steps/epoch"
                + (f"; features cached in {extract_s:.1f}s" if mode == "cached" else ""))

    for epoch in range(start_epoch, cfg.optim.epochs):
        sampler.set_epoch(epoch)
        classifier.train()
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        cur_lr = cfg.optim.lr
        for i, (feats, y) in enumerate(train_batches()):
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
        loss_sum, correct, seen = _all_reduce_counts([loss_sum, correct, seen], device)
        epoch_no = epoch + 1
        last = epoch_no == cfg.optim.epochs
        if epoch_no % cfg.linear.eval_every == 0 or last:
            top1, top5 = evaluate()
        try:
            assert_backbone_unchanged(backbone, reference)
        except BackboneChangedError as err:
            if rank == 0:
                write_status(loop_config["status_url"], {"status": "backbone_changed", "epoch": epoch_no,
                                                          "message": str(err)})
                if logger:
                    logger.tags({STATUS_TAG: "backbone_changed"})
            raise
        metrics = {
            "epoch": epoch_no,
            "loss": loss_sum / seen,
            "train_top1": correct / seen,
            "linear_top1": top1,
            "linear_top5": top5,
            "lr": cur_lr,
            "images_per_s": seen / train_time,
            "epoch_time_s": time.perf_counter() - t0,
        }
        if logger:
            evaluated = epoch_no % cfg.linear.eval_every == 0 or last
            logger.metrics({k: v for k, v in metrics.items()
                            if k != "epoch" and (evaluated or not k.startswith("linear_"))}, step=epoch_no)
            val = f"val top-1 {top1:.4f}  top-5 {top5:.4f}" if top1 is not None else "val not yet evaluated"
            console(f"epoch {epoch_no}/{cfg.optim.epochs}  loss {metrics['loss']:.4f}  train top-1 "
                    f"{metrics['train_top1']:.4f}  {val}  lr {cur_lr:.4g}  {metrics['epoch_time_s']:.1f}s")
        # Ray gets a report (a barrier, ~1-2 s in Train V2) only with a checkpoint: a cached-feature epoch
        # takes milliseconds, and MLflow already has every epoch's metrics.
        if epoch_no % cfg.run.checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                save_training_checkpoint(
                    tmp,
                    rank=rank,
                    model_state={f"fc.{k}": v for k, v in fc.state_dict().items()} if rank == 0 else None,
                    optimizer_state=optimizer.state_dict() if rank == 0 else None,
                    scaler_state=None,
                    train_state={"epoch": epoch_no, "linear_top1": top1, "linear_top5": top5},
                    meta={"config": cfg.model_dump(mode="json"), "encoder": loop_config["encoder"],
                          "metrics": metrics, "world_size": world, "mocoray": __version__,
                          "torch": torch.__version__},
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch_no:04d}")
    if rank == 0:
        write_status(loop_config["status_url"], {"status": "completed", "epoch": cfg.optim.epochs,
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


def _absolute(source: str) -> str:
    return source if "://" in source else str(Path(source).expanduser().resolve())


def _arch_from_meta(source: str) -> tuple[str, bool] | None:
    """(arch, cifar_stem) from a checkpoint directory's meta.json; None for files and foreign dirs."""
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.isdir(path) or not fs.exists(path.rstrip("/") + "/meta.json"):
        return None
    model = read_meta(source).get("config", {}).get("model", {})
    return (model["arch"], bool(model.get("cifar_stem", False))) if "arch" in model else None


def resolve_encoder(cfg: LinearConfig) -> EncoderSource:
    """Where the weights are and which architecture they fit, from the run / checkpoint / config.

    A pretraining run is looked up in the configured tracking store; a checkpoint path is looked up
    there too (when tracking is on), so that a checkpoint of a tracked run keeps its lineage.
    """
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    enc = cfg.encoder
    if enc.random_init:
        return EncoderSource(None, enc.arch, bool(enc.cifar_stem))  # type: ignore[arg-type]
    run_id = experiment = None
    found: tuple[str, bool] | None = None
    if enc.pretrain_run:
        lineage = run_lineage(tracking_uri, enc.pretrain_run)
        if lineage["job"] != "pretrain":
            raise ValueError(f"MLflow run {enc.pretrain_run} is a {lineage['job'] or 'non-mocoray'} run, "
                             "not a pretraining run (tag mocoray.job=pretrain)")
        if not lineage["checkpoint"]:
            raise ValueError(f"pretraining run {enc.pretrain_run} ({lineage['run_name']}, {lineage['status']}) has "
                             "no mocoray.checkpoint tag: it has not finished with a checkpoint")
        source, run_id, experiment = lineage["checkpoint"], lineage["run_id"], lineage["experiment"]
        params = lineage["params"]
        if "model.arch" in params:
            found = (params["model.arch"], params.get("model.cifar_stem", "False") == "True")
    else:
        source = _absolute(enc.checkpoint)  # type: ignore[arg-type]
        fs, path = fsspec.core.url_to_fs(source)
        if not fs.exists(path):
            raise FileNotFoundError(f"encoder.checkpoint: nothing at {source}")
        if cfg.tracking.enabled:
            try:
                run_id = (find_run_by_tag(tracking_uri, CHECKPOINT_TAG, source)
                          or find_run_by_tag(tracking_uri, "mocoray.backbone", source))
                experiment = run_lineage(tracking_uri, run_id)["experiment"] if run_id else None
            except Exception as err:  # lineage is a bonus here; the checkpoint itself is what counts
                log.warning("could not look up the run of %s in MLflow: %s", source, err)
    found = _arch_from_meta(source) or found
    if found is None and enc.arch is None:
        raise ValueError(f"encoder.arch is required for {source}: a file has no meta.json saying which "
                         "architecture it holds (e.g. --arch resnet50 for moco_v2_800ep_pretrain.pth.tar)")
    arch = enc.arch or found[0]  # type: ignore[index]
    cifar_stem = enc.cifar_stem if enc.cifar_stem is not None else (found[1] if found else False)
    if found and (arch, cifar_stem) != found:
        raise ValueError(f"encoder.arch={arch} / cifar_stem={cifar_stem} contradict {source}, which holds a "
                         f"{found[0]} with cifar_stem={found[1]}; leave them unset to use the checkpoint's")
    return EncoderSource(source, arch, cifar_stem, run_id, experiment)


def _safe(what: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # tracking must not turn a finished evaluation into a failure
        log.warning("MLflow %s failed: %s", what, err)


def _open_mlflow_run(cfg: LinearConfig, encoder: EncoderSource, run_dir: str, uri: str) -> str:
    experiment = (encoder.pretrain_experiment if encoder.pretrain_experiment and not cfg.experiment_given
                  else cfg.tracking.experiment)
    params = flatten(cfg.model_dump(mode="json"))
    params.update({"encoder.arch": encoder.arch, "encoder.cifar_stem": encoder.cifar_stem,
                   "encoder.checkpoint": encoder.label})
    tags = {JOB_TAG: "linear", CHECKPOINT_TAG: encoder.label, "mocoray.run_dir": run_dir,
            "mocoray.linear_mode": cfg.linear.mode}
    if encoder.pretrain_run_id:
        tags[PRETRAIN_RUN_TAG] = encoder.pretrain_run_id
        tags["mlflow.note.content"] = (f"Linear evaluation ({cfg.linear.mode}) of pretraining run "
                                       f"`{encoder.pretrain_run_id}`, checkpoint `{encoder.label}`.")
    return start_run(uri, experiment, cfg.run.name, params, tags, run_key=run_dir)


def run_linear_eval(cfg: LinearConfig, address: str | None = None, resume: bool = False) -> LinearResult:
    """Run one linear evaluation; returns where its results are (raises LinearEvalFailed otherwise)."""

    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    encoder = resolve_encoder(cfg)
    build_frozen_backbone(encoder, cfg.run.seed)  # load once here: a bad file fails before Ray starts

    storage = absolute_storage(cfg.run.storage_path)
    run_dir = storage.rstrip("/") + "/" + cfg.run.name
    try:
        status_url = prepare_run_dir(run_dir, cfg.run.name, resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise LinearEvalFailed(str(err)) from None

    run_id = None
    if tracking_uri:
        try:
            run_id = _open_mlflow_run(cfg, encoder, run_dir, tracking_uri)
        except Exception as err:  # an unreachable tracking server must not stop the evaluation
            log.warning("MLflow unavailable at %s (%s); evaluating without tracking", tracking_uri, err)
            print(f"[mocoray] warning: MLflow unavailable at {tracking_uri}: {str(err).splitlines()[0][:200]}")
            tracking_uri = None

    init_ray(address)
    trainer = make_torch_trainer(
        train_loop_per_worker,
        {"cfg": cfg.model_dump(mode="json"), "encoder": asdict(encoder), "tracking_uri": tracking_uri,
         "mlflow_run_id": run_id, "status_url": status_url},
        cfg.run, storage,
    )
    try:
        result = trainer.fit()
        error = None
    except Exception as err:
        result, error = None, err
    status = read_status(status_url) or {"status": "failed"}
    if error is not None or status["status"] != "completed":
        if run_id:
            _safe("end_run", end_run, tracking_uri, run_id, "FAILED", {STATUS_TAG: status["status"]})
        reason = status.get("message") or str(error)
        raise LinearEvalFailed(f"linear evaluation {cfg.run.name!r} failed ({status['status']}): {reason}")

    checkpoint = checkpoint_url(result, storage)
    metrics = dict(result.metrics or {})
    if run_id:
        final = {"linear_top1_final": status["linear_top1"], "linear_top5_final": status["linear_top5"]}
        _safe("log final metrics", MetricLogger(tracking_uri, run_id).metrics, final, step=cfg.optim.epochs)
        tags = {STATUS_TAG: "completed"}
        if checkpoint:
            tags[FC_CHECKPOINT_TAG] = checkpoint
        _safe("end_run", end_run, tracking_uri, run_id, "FINISHED", tags)
        if encoder.pretrain_run_id:  # the link back, for people browsing the pretraining run
            _safe("tag the pretraining run", MetricLogger(tracking_uri, encoder.pretrain_run_id).tags,
                  {LINEAR_RUN_TAG: run_id})
    return LinearResult(run_dir=run_dir, checkpoint=checkpoint, metrics=metrics, status=status["status"],
                        mlflow_run_id=run_id, tracking_uri=tracking_uri, encoder=encoder)
