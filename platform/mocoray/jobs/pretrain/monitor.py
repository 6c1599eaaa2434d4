"""The pretraining monitor: kNN (and logistic-regression) top-1 of the backbone's features against the
same encoder at random init, BN statistics recomputed on training images for a fair baseline.
"""

from __future__ import annotations

import torch

from ...config import PretrainConfig
from ...core.backbones import build_backbone
from ...core.distributed import all_reduce_sum, rank_world
from ...core.features import extract_features
from ...core.knn import knn_top1
from ...core.logreg import fit_logreg
from ...data import PretrainData, image_batches
from ...data.base import subset
from ..calibration import recompute_bn_on_images


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
