"""MoCo pretraining as a Ray Train job: `run_pretrain` (driver) and `train_loop_per_worker` (workers).

Driver: validated config -> MLflow run -> TorchTrainer(ScalingConfig, RunConfig) -> fit -> export.
Worker: data shard -> MoCo (DDP for the query encoder) -> epochs of `train_one_epoch` (the core MoCo
step) -> `evaluate_knn` monitor -> report metrics (+ checkpoint) to Ray; rank 0 logs to MLflow.
Mid-epoch checkpoints (a spot reclaim notice, `run.checkpoint_every_steps`) record the step within the
epoch; the epoch's global sample order does not depend on the number of workers (`data.sampler`), so a
run resumes exactly where it stopped, on any world size of its elastic range.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from .. import __version__, storage
from ..checkpoints import (
    checkpoint_dir_name,
    checkpoint_epoch,
    checkpoint_position,
    newest_complete_checkpoint,
    restore_training_checkpoint,
    save_training_checkpoint,
)
from ..config import PretrainConfig, dump_yaml, flatten
from ..core.amp import AMP_DTYPES
from ..core.augment import AugmentSpec, BatchAugment, moco_spec, two_view_transform
from ..core.backbones import build_backbone
from ..core.bn_stats import average_bn_statistics
from ..core.compiled import compile_encoders, make_sgd
from ..core.distributed import all_reduce_sum, rank_world, same_on_all_ranks
from ..core.features import extract_features
from ..core.knn import knn_top1
from ..core.moco import Encoder, MoCo, NonFiniteLossError, train_step, unwrap
from ..core.schedule import lr_at, momentum_at
from ..core.shuffle_bn import resolve_bn_mode
from ..data import PretrainData, build_pretrain_data, image_batches
from ..data.base import Resized, SkipCorrupt, TensorImages, Transformed, collate_batch, subset
from ..data.device_decode import DeviceJpegAugment, collate_encoded, encoded_train_dataset
from ..data.fingerprint import dataset_records
from ..data.sampler import GlobalBatchSampler
from ..encoders import export_backbone
from ..gpu_metrics import gpu_monitor
from ..logreg import fit_logreg
from ..tracking import (
    BACKBONE_TAG,
    CHECKPOINT_TAG,
    JOB_TAG,
    RESUMED_WITH_TAG,
    RUN_DIR_TAG,
    STATUS_TAG,
    MetricLogger,
    TrackingUnavailableError,
    last_logged_step,
    require_server,
    resolve_tracking_uri,
    run_status,
    safely,
    start_run,
)
from ..tracking_artifacts import encoder_info, log_environment, record_encoder, record_job_start
from ..tracking_outbox import UNSENT_FILE
from . import interrupts, runtime
from .calibration import recompute_bn_on_images
from .faults import Faults
from .preemption import RECORD_FILE, StepCheckpoints, note_resume
from .preflight import check_pretrain_inputs
from .progress import StepProgress
from .resume import ResumePoint, find_resume_point, record_config

# ---------------------------------------------------------------------------------------------------
# Worker: building blocks


def build_moco(cfg: PretrainConfig, bn_mode: str) -> MoCo:
    backbone, feat_dim = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    encoder = Encoder(backbone, feat_dim, cfg.moco.dim, cfg.moco.use_mlp, cfg.moco.head_bn)
    model = MoCo(encoder, cfg.moco.queue_size, cfg.moco.momentum, cfg.moco.temperature, bn_mode, cfg.moco.num_splits)
    if bn_mode == "sync":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def augment_spec(cfg: PretrainConfig) -> AugmentSpec:
    """The two-view recipe of `moco.version` at `data.image_size`, with the recipe's own crop, blur, colour
    jitter and flip."""
    spec = moco_spec(cfg.moco.version, cfg.data.image_size, cfg.data.blur, (cfg.data.crop_min_scale, 1.0))
    spec = dataclasses.replace(spec, flip_p=cfg.data.flip_p)
    s = cfg.data.color_jitter
    return spec if s is None else dataclasses.replace(spec, jitter=(s, s, s, min(s, spec.jitter[3])))


def train_loader(cfg: PretrainConfig, dataset, rank: int, world: int) -> tuple[DataLoader, GlobalBatchSampler]:
    """Batches of encoded files (GPU decode), uint8 images (device augmentation) or of two augmented views
    (loader augmentation): this rank's share of each global batch."""
    collate = collate_batch
    if cfg.data.decode == "gpu":
        dataset, collate = encoded_train_dataset(dataset), collate_encoded
    elif cfg.data.augment == "loader":
        spec = augment_spec(cfg)
        dataset = Transformed(SkipCorrupt(dataset), two_view_transform(spec))
    elif not isinstance(dataset, TensorImages):
        dataset = Resized(SkipCorrupt(dataset), cfg.data.image_size)
    sampler = GlobalBatchSampler(len(dataset), cfg.optim.batch_size, rank, world, cfg.run.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.optim.batch_size // world,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.loader_workers,
        collate_fn=collate,
        pin_memory=cfg.run.use_gpu,
        persistent_workers=cfg.data.loader_workers > 0,
        # Its own generator: each epoch's iterator draws a seed, which must not come from the global RNG
        # (a run resumed mid-epoch would draw it at another point, and its augmentations would change).
        generator=torch.Generator().manual_seed(cfg.run.seed * 1000 + rank),
    )
    return loader, sampler


TwoViews = Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor, int]]


def two_views(cfg: PretrainConfig) -> TwoViews:
    """batch -> (im_q, im_k, images replaced) on the device, for whatever `train_loader` serves."""
    spec = augment_spec(cfg)
    if cfg.data.decode == "gpu":
        return DeviceJpegAugment(spec).two_views
    if cfg.data.augment == "device":
        augment = BatchAugment(spec)
        return lambda x, device: (*augment.two_views(x.to(device, non_blocking=True)), 0)
    return lambda x, device: (x[0].to(device, non_blocking=True), x[1].to(device, non_blocking=True), 0)


@dataclass
class TrainState:
    """What a checkpoint carries besides model, optimizer and scaler."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    knn_top1_init: float | None = None  # the same encoder at random init: every run's own baseline
    knn_top1_last: float | None = None
    step_in_epoch: int = 0  # steps of epoch `epoch` already trained (a mid-epoch checkpoint)
    epoch_loss_sum: float = 0.0  # over those steps: a resumed epoch still reports its whole mean
    epoch_acc_sum: float = 0.0
    preemptions: int = 0  # reclaim notices the run received
    steps_lost: int = 0  # steps trained before a restart that no checkpoint kept
    logreg_top1_init: float | None = None  # knn.logreg: the same for logistic regression
    logreg_top1_last: float | None = None

    def monitor(self, knn: float, logreg: float | None, init: bool = False) -> None:
        self.knn_top1_last, self.logreg_top1_last = knn, logreg
        if init:
            self.knn_top1_init, self.logreg_top1_init = knn, logreg


@dataclass
class EpochStats:
    loss: float
    contrastive_acc: float
    lr: float
    momentum: float
    steps: int  # trained in this call (fewer than the epoch's when it resumed mid-epoch)
    train_time_s: float
    corrupt_images_skipped: int = 0


def train_one_epoch(model, loader, optimizer, scaler, views: TwoViews, cfg: PretrainConfig,
                    epoch: int, state: TrainState, device: torch.device, channels_last: bool, rank: int,
                    faults: Faults, progress: StepProgress | None = None,
                    step_checkpoints: StepCheckpoints | None = None) -> EpochStats:
    """The epoch's MoCo steps from `state.step_in_epoch` on; raises NonFiniteLossError on every rank at once
    if the loss blows up. `step_checkpoints` may save a mid-epoch checkpoint after any step.

    Ends with one set of BN running statistics on every rank (see `average_bn_statistics`): each rank's
    followed its own shard, and what comes next (kNN, checkpoint, export) must see the same encoder everywhere.
    Once per epoch is enough, as nothing reads the running statistics during training (both encoders run in
    training mode), and it costs one small all-reduce instead of DDP's buffer broadcast at every step (which
    would also re-send the K x dim queue).
    """
    model.train()
    steps = loader.sampler.steps_per_epoch
    start = state.step_in_epoch
    lr = cfg.optim.effective_lr
    amp_dtype = AMP_DTYPES[cfg.run.amp]
    t0 = time.perf_counter()
    skipped = 0
    cur_lr, moco = lr, unwrap(model)
    for i, (x, _labels, n_skipped) in enumerate(loader, start=start):
        if i == start + 1:
            faults.maybe_crash(epoch, rank)
        cur_lr = lr_at(epoch + i / steps, lr, cfg.optim.epochs, cfg.optim.schedule, cfg.optim.warmup_epochs,
                       cfg.optim.milestones, cfg.optim.gamma)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        moco.momentum = momentum_at((epoch + i / steps) / cfg.optim.epochs, cfg.moco.momentum,
                                    cfg.moco.momentum_schedule)
        im_q, im_k, replaced = views(x, device)
        skipped += int(n_skipped) + replaced
        if channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        im_q = faults.poison(im_q, state.global_step, rank)
        res = train_step(model, im_q, im_k, optimizer, scaler, amp_dtype, cfg.optim.clip_grad_norm)
        state.epoch_loss_sum += res.loss
        state.epoch_acc_sum += res.accuracy
        state.global_step += 1
        if progress is not None:
            progress.step(i, res.loss, cur_lr, state.global_step)
        state.step_in_epoch = i + 1
        faults.slow_down()
        if step_checkpoints:
            step_checkpoints.after_step(state)
    (skipped,) = all_reduce_sum([skipped], device)  # every rank joins, skipped images or not
    average_bn_statistics(unwrap(model))
    stats = EpochStats(loss=state.epoch_loss_sum / steps, contrastive_acc=state.epoch_acc_sum / steps, lr=cur_lr,
                       momentum=moco.momentum, steps=steps - start, train_time_s=time.perf_counter() - t0,
                       corrupt_images_skipped=int(skipped))
    state.step_in_epoch, state.epoch_loss_sum, state.epoch_acc_sum = 0, 0.0, 0.0
    return stats


def knn_bank(data: PretrainData, cfg: PretrainConfig):
    """The labelled images that vote: all of them, or `knn.max_bank` of them (a fixed random choice), for every
    kind of dataset (an ImageNet bank of 1.28 M images would be ~10 GB of features on every rank)."""
    bank = data.knn_bank
    if cfg.knn.max_bank and len(bank) > cfg.knn.max_bank:
        chosen = torch.randperm(len(bank), generator=torch.Generator().manual_seed(0))[: cfg.knn.max_bank]
        bank = subset(bank, chosen.tolist())
    return bank


def evaluate_knn(backbone: torch.nn.Module, data: PretrainData, cfg: PretrainConfig, device: torch.device,
                 channels_last: bool) -> tuple[float, float | None]:
    """Weighted kNN top-1 of the backbone's features (the labelled bank votes for each val image) and, with
    `knn.logreg`, the top-1 of logistic regression fitted on the same bank (on rank 0; None otherwise)."""
    bank = knn_bank(data, cfg)
    size = cfg.data.image_size

    def features(dataset):
        return extract_features(
            backbone, len(dataset),
            lambda idx: image_batches(dataset, idx, 256, size, cfg.data.loader_workers),
            device, size, channels_last,
        )

    bank_f, bank_y = features(bank)
    val_f, val_y = features(data.knn_val)
    knn = knn_top1(bank_f, bank_y, val_f, val_y, cfg.knn.k, cfg.knn.temperature)
    if not cfg.knn.logreg:
        return knn, None
    rank = rank_world()[0]
    logreg = fit_logreg(bank_f, bank_y, val_f, val_y, cfg.run.seed).top1 if rank == 0 else 0.0
    return knn, all_reduce_sum([logreg], device)[0]  # every rank reports the same number


def evaluate_recalibrated(backbone: torch.nn.Module, data: PretrainData, cfg: PretrainConfig, device: torch.device,
                          channels_last: bool) -> tuple[float, float | None]:
    """`evaluate_knn` on a plain copy of the backbone (same weights, plain BatchNorm) whose BN statistics are
    recomputed on training images first; the backbone itself is untouched."""
    plain, _ = build_backbone(cfg.model.arch, cfg.model.cifar_stem)
    plain.load_state_dict(backbone.state_dict())
    plain.to(device)
    if channels_last:
        plain.to(memory_format=torch.channels_last)
    recompute_bn_on_images(plain, data.train, cfg.data.image_size, device, channels_last, cfg.data.loader_workers)
    return evaluate_knn(plain, data, cfg, device, channels_last)


def knn_at_init(backbone: torch.nn.Module, data: PretrainData, cfg: PretrainConfig, device: torch.device,
                channels_last: bool) -> tuple[float, float | None]:
    """kNN (and, with `knn.logreg`, logistic-regression) top-1 of the encoder at random init, every run's own
    baseline, measured with recomputed BN statistics: at their init values the features are degenerate and
    the baseline would be too low. Training starts from the model as it is."""
    return evaluate_recalibrated(backbone, data, cfg, device, channels_last)


def evaluate_trained(backbone: torch.nn.Module, data: PretrainData, cfg: PretrainConfig, device: torch.device,
                     channels_last: bool) -> tuple[float, float | None]:
    """The monitor after an epoch: on the running statistics training left, or (`knn.precise_bn`) on
    recomputed ones like the baseline, whose copy must not draw from the training RNG (its init weights
    are overwritten anyway), else the run would train differently with the option on, and on resume."""
    if not cfg.knn.precise_bn:
        return evaluate_knn(backbone, data, cfg, device, channels_last)
    with torch.random.fork_rng(devices=[]):
        return evaluate_recalibrated(backbone, data, cfg, device, channels_last)


def epoch_metrics(state: TrainState, stats: EpochStats, cfg: PretrainConfig, epoch_time_s: float) -> dict:
    return {
        "epoch": state.epoch,
        "loss": stats.loss,
        "contrastive_acc": stats.contrastive_acc,
        "knn_top1": state.knn_top1_last,
        "knn_top1_init": state.knn_top1_init,
        "knn_margin": state.knn_top1_last - state.knn_top1_init,
        **({"logreg_top1": state.logreg_top1_last, "logreg_top1_init": state.logreg_top1_init,
            "logreg_margin": state.logreg_top1_last - state.logreg_top1_init}
           if state.logreg_top1_last is not None else {}),
        "lr": stats.lr,
        "momentum": stats.momentum,
        "pairs_per_s": stats.steps * cfg.optim.batch_size / stats.train_time_s,
        "epoch_time_s": epoch_time_s,  # training and kNN
        "corrupt_images_skipped": stats.corrupt_images_skipped,
        "preemptions": state.preemptions,
        "steps_lost": state.steps_lost,
    }


def epoch_line(m: dict, cfg: PretrainConfig, monitored: bool = True) -> str:
    monitor = ""
    if monitored:
        monitor = f"kNN {m['knn_top1']:.4f} ({m['knn_margin']:+.4f} vs init)  " + (
            f"logreg {m['logreg_top1']:.4f} ({m['logreg_margin']:+.4f})  " if "logreg_top1" in m else "")
    return (f"epoch {m['epoch']}/{cfg.optim.epochs}  loss {m['loss']:.4f}  acc {m['contrastive_acc']:.3f}  "
            + monitor + f"lr {m['lr']:.4g}  "
            f"{m['pairs_per_s']:.0f} pairs/s  {m['epoch_time_s']:.1f}s")


def epochs_logged(logger: MetricLogger | None) -> int:
    """The last epoch the MLflow run already has metrics for (0: none), so that no epoch is logged twice.

    Read before each epoch is logged, as an epoch can be trained again: after a resume from a checkpoint
    older than the last logged epoch, after a worker-group restart, and the workers of an interrupted attempt
    can outlive their driver by a few seconds (Ray ends them asynchronously) and log one more epoch.
    """
    if logger is None or logger.run_id is None:
        return 0
    return safely("read of the logged epochs", last_logged_step, logger.uri, logger.run_id, "loss") or 0


def report_nonfinite_loss(err: NonFiniteLossError, epoch: int, state: TrainState, rank: int, status_url: str,
                          logger: MetricLogger | None) -> None:
    """Every rank raised at the same step (the check is all-reduced). No checkpoint is written from here on:
    the last good one stays the run's latest."""
    if rank == 0:
        runtime.write_status(status_url, {"status": "nonfinite_loss", "epoch": epoch + 1, "step": state.global_step,
                                          "message": str(err)})
        if logger:
            logger.tags({STATUS_TAG: "nonfinite_loss"})
        runtime.console(f"stopping: {err} at epoch {epoch + 1}, step {state.global_step}")


def save_checkpoint(model, optimizer, scaler, state: TrainState, cfg: PretrainConfig, metrics: dict, rank: int,
                    world: int, bn_mode: str) -> str:
    """Report `metrics` to Ray with a checkpoint: every rank writes its RNG state, rank 0 the rest.

    Returns the checkpoint's name (`checkpoint_dir_name`)."""
    import ray.train

    name = checkpoint_dir_name(state.epoch, state.step_in_epoch)
    if state.step_in_epoch:  # every rank is here (the preemption check is a collective)
        # The ranks' BN statistics are averaged at each epoch's end; a mid-epoch checkpoint holds that average
        # too, so a run resumed from it on any world size ends the epoch with the same statistics as one
        # that never stopped (the running averages are linear in their updates: averaging early changes
        # nothing at the epoch's end).
        average_bn_statistics(unwrap(model))

    with tempfile.TemporaryDirectory() as tmp:
        save_training_checkpoint(
            tmp,
            rank=rank,
            model_state=unwrap(model).state_dict() if rank == 0 else None,
            optimizer_state=optimizer.state_dict() if rank == 0 else None,
            scaler_state=scaler.state_dict() if rank == 0 else None,
            train_state=vars(state),
            meta={"config": cfg.model_dump(mode="json"), "metrics": metrics, "bn_mode_effective": bn_mode,
                  "world_size": world, "mocoray": __version__, "torch": torch.__version__},
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
    return name


def starting_checkpoint(loop_config: dict[str, Any]) -> tuple[Any, bool]:
    """Where this attempt starts, and whether that checkpoint is this run's own: Ray's latest checkpoint or the
    newest complete one the driver found on disk, whichever is further on (an interrupt can land after a
    checkpoint is written and before Ray's controller registers it); with neither, `--resume-from` (another
    run's); else None (a new run)."""
    import ray.train

    candidates = [c for c in (ray.train.get_checkpoint(), loop_config.get("newest_checkpoint")) if c]
    candidates = [ray.train.Checkpoint(c) if isinstance(c, str) else c for c in candidates]
    if candidates:
        return max(candidates, key=lambda c: checkpoint_position(c.path) or (0, 0)), True
    if loop_config.get("resume_from"):
        return ray.train.Checkpoint(loop_config["resume_from"]), False
    return None, False


def restore(checkpoint, model, optimizer, scaler, rank: int) -> TrainState:
    with checkpoint.as_directory() as ckpt_dir:
        return TrainState(**restore_training_checkpoint(ckpt_dir, rank, model, optimizer, scaler))


def check_same_queue(model: torch.nn.Module) -> None:
    """Every rank must hold the same queue and pointer (after a restart on any world size, too)."""
    queue = unwrap(model).queue
    pointer = torch.tensor([float(int(queue.ptr))], dtype=torch.float64, device=queue.keys.device)
    if not same_on_all_ranks(torch.cat([queue.keys.flatten().double(), pointer])):
        raise RuntimeError("the MoCo queue differs between ranks after loading the checkpoint")


def mid_epoch_metrics(state: TrainState, last_epoch: dict) -> dict:
    """What a mid-epoch checkpoint reports: the last epoch's metrics (so Tune sees its metric) and the position."""
    return {**last_epoch, "epoch": state.epoch, "global_step": state.global_step,
            "step_in_epoch": state.step_in_epoch, "preemptions": state.preemptions}


MONITOR_PREFIXES = ("knn_", "logreg_")


def log_epoch(logger: MetricLogger, metrics: dict, monitored: bool = True) -> None:
    """An epoch's metrics at step = epoch; the kNN / logreg ones only on epochs that measured them (Ray's
    reports carry the last measured values on every epoch, which Tune's schedulers need)."""
    logger.metrics({k: v for k, v in metrics.items()
                    if k != "epoch" and (monitored or not k.startswith(MONITOR_PREFIXES))}, step=metrics["epoch"])


def relog_lost_epoch(logger: MetricLogger, checkpoint) -> None:
    """An epoch's metrics are logged after its checkpoint: if the group stopped between the two, the epoch
    is missing in MLflow. The checkpoint's meta.json has its metrics: log them now (unless they arrived)."""
    logged = logger.logged_steps("loss")
    if logged is None:
        return
    with checkpoint.filesystem.open_input_stream(checkpoint.path.rstrip("/") + "/meta.json") as f:
        metrics = json.loads(f.read())["metrics"]
    if metrics["epoch"] not in logged:
        log_epoch(logger, metrics)


def start_attempt(logger: MetricLogger, state: TrainState, checkpoint, same_run: bool, world: int,
                  record_url: str) -> None:
    """Rank 0, each time the worker group (re)starts: where it resumed, the steps a restart lost, the world size.

    `same_run`: the checkpoint is this run's own (a restart or --resume), not a --resume-from of another's."""
    if checkpoint is not None:
        name = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
        state.steps_lost += note_resume(record_url, state.global_step, name, world)
        runtime.console(f"resumed from checkpoint {name}: epoch {state.epoch + 1}, step {state.step_in_epoch} of it "
                        f"(global step {state.global_step}) on {world} worker(s)")
        if same_run and state.epoch and not state.step_in_epoch:
            relog_lost_epoch(logger, checkpoint)
    logger.metrics({"world_size": world}, step=state.global_step)  # over time: one point per (re)start


# ---------------------------------------------------------------------------------------------------
# Worker: the loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = PretrainConfig.model_validate(loop_config["cfg"])
    faults = Faults(**loop_config["faults"])
    runtime.quiet_ray_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = runtime.worker_device(cfg.run)

    data = build_pretrain_data(cfg.data)
    if cfg.moco.queue_size >= len(data.train) and rank == 0:
        runtime.console(f"warning: moco.queue_size={cfg.moco.queue_size} >= {len(data.train)} training images: "
                "each image's own previous key will sit among its negatives; learning may stall")
    bn_mode = resolve_bn_mode(cfg.moco.bn_mode, world, device.type)
    torch.manual_seed(cfg.run.seed)  # identical initial model and queue on every rank
    model = build_moco(cfg, bn_mode).to(device)
    channels_last = cfg.run.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.run.compile:
        compile_encoders(model)
    optimizer = make_sgd(model.encoder_q.parameters(), cfg.optim.effective_lr, cfg.optim.sgd_momentum,
                         cfg.optim.weight_decay, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.amp == "fp16" and device.type == "cuda")
    torch.manual_seed(cfg.run.seed * 1000 + 1 + rank)  # augmentation randomness differs per rank

    checkpoint, same_run = starting_checkpoint(loop_config)
    state = TrainState()
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, scaler, rank)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=runtime.ddp_kwargs())
        check_same_queue(model)
    loader, sampler = train_loader(cfg, data.train, rank, world)
    if len(loader) == 0:
        raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is larger than the {len(data.train)} training images")
    views = two_views(cfg)
    logger = None
    if rank == 0:  # every start of the worker group: the world size may differ after a restart
        logger = MetricLogger(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"),
                              loop_config["unsent_url"])
        start_attempt(logger, state, checkpoint, same_run, world, loop_config["preemption_record"])
        log_environment(loop_config.get("tracking_uri"), loop_config.get("mlflow_run_id"), world, device)
    progress = StepProgress(cfg.progress, cfg.optim.batch_size, cfg.optim.epochs, rank, logger)
    backbone = unwrap(model).encoder_q.backbone

    if state.knn_top1_init is None:
        state.monitor(*knn_at_init(backbone, data, cfg, device, channels_last), init=True)
        if logger:
            init = {"knn_top1": state.knn_top1_init, "knn_top1_init": state.knn_top1_init,
                    "logreg_top1": state.logreg_top1_init, "logreg_top1_init": state.logreg_top1_init}
            logger.metrics(init, step=0)
            logger.tags({"mocoray.bn_mode_effective": bn_mode, "mocoray.world_size": world})
            runtime.console(f"{cfg.model.arch}, bn_mode {bn_mode} ({cfg.moco.bn_mode} requested), {world} worker(s), "
                    f"{len(data.train)} images, {len(loader)} steps/epoch; kNN top-1 at init {state.knn_top1_init:.4f}")

    metrics = {"knn_top1": state.knn_top1_last, "knn_top1_init": state.knn_top1_init}  # until an epoch ends
    step_checkpoints = StepCheckpoints(
        cfg.run.preemption_check_steps, cfg.run.checkpoint_every_steps, rank, loop_config["preemption_record"],
        lambda: save_checkpoint(model, optimizer, scaler, state, cfg, mid_epoch_metrics(state, metrics), rank, world,
                                bn_mode))
    with gpu_monitor(device) as monitor:  # GPU utilisation and memory next to pairs/s (nothing on CPUs)
        for epoch in range(state.epoch, cfg.optim.epochs):
            sampler.set_epoch(epoch, state.step_in_epoch)
            t0 = time.perf_counter()
            progress.start_epoch(epoch, len(loader), log_metrics=epoch + 1 > epochs_logged(logger))
            try:
                stats = train_one_epoch(model, loader, optimizer, scaler, views, cfg, epoch, state, device,
                                        channels_last, rank, faults, progress, step_checkpoints)
            except NonFiniteLossError as err:
                report_nonfinite_loss(err, epoch, state, rank, loop_config["status_url"], logger)
                return
            state.epoch = epoch + 1
            last = state.epoch == cfg.optim.epochs
            monitored = state.epoch % cfg.knn.every == 0 or last
            if monitored:
                state.monitor(*evaluate_trained(backbone, data, cfg, device, channels_last))
            metrics = epoch_metrics(state, stats, cfg, time.perf_counter() - t0) | monitor.epoch_averages()
            if state.epoch % cfg.run.checkpoint_every == 0 or last:
                save_checkpoint(model, optimizer, scaler, state, cfg, metrics, rank, world, bn_mode)
                faults.maybe_interrupt_driver(state.epoch, rank)
            else:
                ray.train.report(metrics)
            if logger:  # after the checkpoint: a group stopped in between re-logs it when it resumes
                if state.epoch > epochs_logged(logger):
                    log_epoch(logger, metrics, monitored)
                runtime.console(epoch_line(metrics, cfg, monitored))
            faults.maybe_pause(state.epoch, rank)
    if rank == 0:
        runtime.write_status(loop_config["status_url"], {"status": "completed", "epoch": cfg.optim.epochs,
                                                  "step": state.global_step})


# ---------------------------------------------------------------------------------------------------
# Driver


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: str | None
    metrics: dict[str, Any]
    status: str
    mlflow_run_id: str | None
    tracking_uri: str | None
    backbone_path: str | None
    unsent_metrics: str | None = None  # file of what the tracking server never took (None: everything arrived)


class PretrainFailed(RuntimeError):
    """The job did not complete; `result` holds what it left behind (checkpoint, MLflow run), if anything."""

    exit_code = 1

    def __init__(self, message: str, result: PretrainResult | None = None) -> None:
        super().__init__(message)
        self.result = result


NAME_FREED = " No checkpoint was written, so the run's folder is removed: the same command starts it afresh."


class PretrainInterrupted(PretrainFailed):
    """SIGINT / SIGTERM stopped the job; the process should exit with `exit_code` (130 / 143)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def with_absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """A copy whose local paths are absolute: Ray workers run in their own scratch directories."""
    cfg = cfg.model_copy(deep=True)
    for section, name in (("data", "root"), ("data", "val_root"), ("run", "storage_path")):
        obj = getattr(cfg, section)
        if getattr(obj, name):
            setattr(obj, name, storage.absolute(getattr(obj, name)))
    return cfg


def close_tracking(job: runtime.JobRun, status: str, tags: dict[str, str]) -> str | None:
    """Send what the workers could not (the server may be back), the final tags, then close the MLflow run.

    Returns the file of what the server still did not take (the MLflow run then stays RUNNING), or None.
    A run that did not complete and was already ended elsewhere (a trial Tune stopped early, which the sweep
    marks KILLED) keeps that status and those tags."""
    if not job.mlflow_run_id:
        return None
    logger = MetricLogger(job.tracking_uri, job.mlflow_run_id, storage.join(job.run_dir, UNSENT_FILE))
    ended_elsewhere = status != "FINISHED" and safely(
        "status of the run", run_status, job.tracking_uri, job.mlflow_run_id) not in (None, "RUNNING")
    if not ended_elsewhere:
        logger.tags(tags)
    unsent = logger.unsent()
    if unsent is None and not ended_elsewhere:
        job.end_tracking(status, {})
    return unsent


def run_pretrain(
    cfg: PretrainConfig,
    address: str | None = None,
    resume: bool | str = False,
    resume_from: str | None = None,
    extra_tags: dict[str, str] | None = None,
    callbacks: list | None = None,
    faults: Faults | None = None,
) -> PretrainResult:
    """Run (or, with `resume`, continue) one pretraining job; returns where its results are.

    resume: False = the run must be new; True = it must exist; "auto" = continue it if it exists
    (what a restarted Tune trial wants). `extra_tags` go on the MLflow run (sweeps add their parent
    link); `callbacks` go to the trainer's RunConfig (sweeps add Tune's report forwarding); `faults`
    injects failures (tests only).

    Everything that can be checked without Ray is checked first, and nothing (run folder, MLflow run) is
    created before Ray is reached. SIGINT / SIGTERM stop the Ray job and raise PretrainInterrupted.
    """
    cfg = with_absolute_paths(cfg)
    run_dir = runtime.run_dir_of(cfg.run)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri) if cfg.tracking.enabled else None
    if uri:
        try:
            require_server(uri)
        except TrackingUnavailableError as err:
            raise PretrainFailed(str(err)) from None
    if resume == "auto":
        resume = storage.exists(run_dir)
    for warning in check_pretrain_inputs(cfg, resume_from):
        print(f"[mocoray] warning: {warning}", file=sys.stderr)
    try:
        runtime.check_run_dir(run_dir, cfg.run.name, bool(resume))
    except (FileExistsError, FileNotFoundError) as err:
        raise PretrainFailed(str(err)) from None
    point = find_resume_point(run_dir, cfg) if resume else None
    for name, value in (point.changed if point else {}).items():
        print(f"[mocoray] resuming with {name}={value}", file=sys.stderr)

    runtime.init_ray(address)
    with interrupts.signals_raise():
        job = None
        try:
            job = runtime.JobRun.prepare(cfg.run, bool(resume))
            return _fit(job, cfg, point, resume_from, extra_tags, callbacks, faults)
        except interrupts.JobInterrupted as sig:
            raise _interrupted(job, sig, point) from None


def _open_tracking(job: runtime.JobRun, cfg: PretrainConfig, point: ResumePoint | None,
                   extra_tags: dict[str, str] | None) -> None:
    """Create (or, resumed, reopen) the MLflow run, with the fields this resume changed as a tag."""
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    tags = {JOB_TAG: "pretrain", RUN_DIR_TAG: job.run_dir, **(extra_tags or {})}
    if point and point.resumed_with:
        tags[RESUMED_WITH_TAG] = json.dumps(point.resumed_with, sort_keys=True)
    job.open_tracking(uri, start_run, uri, cfg.tracking.experiment, cfg.run.name,
                      flatten(cfg.model_dump(mode="json")), tags, job.run_dir)
    record_job_start(job.tracking_uri, job.mlflow_run_id, dump_yaml(cfg),
                     lambda: dataset_records(cfg.data, pretraining=True))


def _fit(job: runtime.JobRun, cfg: PretrainConfig, point: ResumePoint | None, resume_from: str | None,
         extra_tags: dict[str, str] | None, callbacks: list | None, faults: Faults | None) -> PretrainResult:
    record_config(job.run_dir, cfg, point.resumed_with if point else {})
    if cfg.tracking.enabled:
        _open_tracking(job, cfg, point, extra_tags)
    loop_config = job.loop_config(cfg=cfg.model_dump(mode="json"), resume_from=resume_from,
                                  newest_checkpoint=point.checkpoint if point else None,
                                  faults=(faults or Faults()).to_dict(),
                                  preemption_record=storage.join(job.run_dir, RECORD_FILE),
                                  unsent_url=storage.join(job.run_dir, UNSENT_FILE))
    trainer = runtime.make_torch_trainer(train_loop_per_worker, loop_config, cfg.run, job.storage_path, callbacks,
                                         resize_check_s=cfg.run.resize_check_s if cfg.run.elastic else None,
                                         max_preemptions=cfg.run.max_preemptions)
    try:
        result = interrupts.fit(trainer)
    except Exception as err:
        # a run already ended elsewhere keeps its status: Tune's early stop ends a trial's run KILLED, and
        # the trial's own process may see its Train controller torn down (and fail) after that
        job.end_tracking("FAILED", {STATUS_TAG: "failed"}, only_if_running=True)
        freed = NAME_FREED if job.free_name_unless_checkpointed(point is not None) else ""
        raise PretrainFailed(f"pretraining run {cfg.run.name!r} failed: {err}{freed}") from err

    status = job.status() or {"status": "unknown"}
    # the newest complete checkpoint on disk is at least as new as Ray's latest registered one
    checkpoint = newest_complete_checkpoint(job.run_dir) or runtime.checkpoint_url(result, job.storage_path)
    backbone_path = None
    if checkpoint and status["status"] == "completed":
        backbone_path = storage.join(job.run_dir, "backbone.pt")
        export_backbone(checkpoint, backbone_path)
    final_tags = {STATUS_TAG: status["status"]}
    if checkpoint:
        final_tags[CHECKPOINT_TAG] = checkpoint
    if backbone_path:
        final_tags[BACKBONE_TAG] = backbone_path
        if cfg.tracking.log_backbone:
            info = encoder_info(cfg.model.arch, cfg.model.cifar_stem, job.mlflow_run_id, checkpoint)
            record_encoder(job.tracking_uri, job.mlflow_run_id, backbone_path, info)
    unsent = close_tracking(job, "FINISHED" if status["status"] == "completed" else "FAILED", final_tags)
    out = PretrainResult(run_dir=job.run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}),
                         status=status["status"], mlflow_run_id=job.mlflow_run_id, tracking_uri=job.tracking_uri,
                         backbone_path=backbone_path, unsent_metrics=unsent)
    if status["status"] == "nonfinite_loss":
        freed = NAME_FREED if job.free_name_unless_checkpointed(point is not None) else ""
        raise PretrainFailed(
            f"stopped: non-finite loss at epoch {status['epoch']}, step {status['step']} ({status['message']}). "
            f"The last good checkpoint is kept: {checkpoint or 'none was written yet'}. "
            f"Lower optim.lr, enable optim.clip_grad_norm, or check the data.{freed}",
            out,
        )
    return out


def _interrupted(job: runtime.JobRun | None, sig: interrupts.JobInterrupted,
                 point: ResumePoint | None) -> PretrainInterrupted:
    """Stop the Ray job, then mark the run: status file, MLflow run KILLED (mocoray.status=interrupted) with
    its newest complete checkpoint, and a message that says how to continue."""
    interrupts.stop_ray()
    head = f"interrupted ({sig.name}): the Ray job is stopped"
    if job is None:
        return PretrainInterrupted(head + " before the run started.", sig.exit_code)
    newest = newest_complete_checkpoint(job.run_dir)
    job.mark_interrupted(sig.name, {CHECKPOINT_TAG: newest} if newest else None)
    if newest:
        how = (f"The newest complete checkpoint is {newest} (epoch {checkpoint_epoch(newest)}); continue the run "
               "with the same command and --resume.")
    elif job.free_name_unless_checkpointed(point is not None):
        how = NAME_FREED.strip()
    else:
        how = "The run has no complete checkpoint yet; --resume starts it from its first epoch."
    tracked = " and its MLflow run marked KILLED" if job.mlflow_run_id else ""
    return PretrainInterrupted(f"{head}{tracked}. {how}", sig.exit_code)
