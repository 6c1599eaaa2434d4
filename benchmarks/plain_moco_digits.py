"""A plain, single-process MoCo v2 loop on scattered digits under a wall-clock budget: the yardstick for the
demo's learning quality (issue 18).

No Ray, no DDP, no checkpoints: the training split, `small_resnet`, `BatchAugment`, a queue, a momentum key
encoder and InfoNCE, written out in one loop, with the LR cosine over the *time* budget. It prints kNN (k 20,
T 0.1) and logistic-regression top-1 on the val split, at random init (BN statistics recalibrated on the
training images) and at the end, both with the running statistics training left and recalibrated.
The defaults are sweep round 3's values (full width, paper flips); `--widths 16,32,64,256 --flip 0` is the
demo as it ships (docs/tuning.md). Run like the demo it tells whether the platform loses accuracy
against a bare loop; other values try recipes in minutes without a sweep.

    python benchmarks/plain_moco_digits.py --budget 150
    python benchmarks/plain_moco_digits.py --budget 150 --jitter 0 --grayscale 0 --symmetric
    python benchmarks/plain_moco_digits.py --budget 150 --widths 16,32,64,128 --flip 0 --head-bn
    python benchmarks/plain_moco_digits.py --budget 150 --widths 16,32,64,256 --flip 0 --seed 1
    python benchmarks/plain_moco_digits.py --smoke     # seconds, 256 images (the tests' check of the script)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

from _bench import ensure_mocoray_importable, parse_with_smoke

ensure_mocoray_importable()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mocoray.core.augment import BatchAugment, moco_spec, normalize_batch  # noqa: E402
from mocoray.core.backbones import SmallResNet  # noqa: E402
from mocoray.core.bn_stats import recompute_bn_statistics  # noqa: E402
from mocoray.core.knn import knn_top1  # noqa: E402
from mocoray.core.logreg import fit_logreg  # noqa: E402
from mocoray.core.shuffle_bn import convert_to_split_bn  # noqa: E402
from mocoray.data.digits import scattered_digits  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=150, help="training seconds (evaluation not counted)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--queue", type=int, default=1024, help="K")
    p.add_argument("--momentum", type=float, default=0.995, help="m")
    p.add_argument("--temperature", type=float, default=0.1, help="tau")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--crop-min", type=float, default=0.4)
    p.add_argument("--jitter", type=float, default=0.4, help="brightness/contrast/saturation strength (hue <= 0.1)")
    p.add_argument("--grayscale", type=float, default=0.2, help="grayscale probability")
    p.add_argument("--flip", type=float, default=0.5, help="horizontal flip probability")
    p.add_argument("--head-bn", action="store_true", help="BatchNorm after the projection head's hidden layer")
    p.add_argument("--width", type=float, default=1.0, help="small_resnet channel multiplier (1: 32/64/128/256)")
    p.add_argument("--widths", help="small_resnet stage widths, e.g. 16,32,64,256 (overrides --width)")
    p.add_argument("--bn", choices=["plain", "split"], default="split",
                   help="split: SplitBatchNorm (8 groups) for the query encoder and a shuffled key batch")
    p.add_argument("--symmetric", action="store_true", help="both views as queries (loss averaged)")
    p.add_argument("--eval-key-encoder", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None,
                   help="use only the first N training and N val images (default: all, 4,314 and 1,079)")
    p.add_argument("--json", help="also write the figures here")
    return parse_with_smoke(p, argv, budget=2, batch=32, queue=128, max_images=256, threads=1)


def features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    backbone.eval()
    with torch.no_grad():
        out = torch.cat([backbone(normalize_batch(images[i : i + 512])) for i in range(0, len(images), 512)])
    backbone.train()
    return out


def scores(backbone: nn.Module, train, val) -> dict[str, float]:
    ft, fv = features(backbone, train.images), features(backbone, val.images)
    return {"knn": knn_top1(ft, train.labels, fv, val.labels, 20, 0.1),
            "logreg": fit_logreg(ft, train.labels, fv, val.labels).top1}


def recalibrated(backbone: nn.Module, images: torch.Tensor) -> nn.Module:
    out = copy.deepcopy(backbone)
    recompute_bn_statistics(out, (normalize_batch(images[i : i + 256]) for i in range(0, len(images) - 255, 256)))
    return out


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    train, val = scattered_digits()
    if a.max_images:
        train, val = train.subset(range(min(a.max_images, len(train)))), val.subset(range(min(a.max_images, len(val))))
    images = train.images

    widths = tuple(int(w) for w in a.widths.split(",")) if a.widths else \
        tuple(max(8, round(c * a.width)) for c in (32, 64, 128, 256))
    backbone = SmallResNet(widths)
    hidden = [nn.Linear(backbone.out_dim, backbone.out_dim)] + ([nn.BatchNorm1d(backbone.out_dim)] if a.head_bn else [])
    head = nn.Sequential(*hidden, nn.ReLU(), nn.Linear(backbone.out_dim, 128))
    at_init = scores(recalibrated(backbone, images), train, val)
    if a.bn == "split":
        backbone = convert_to_split_bn(backbone, 8)
    query = nn.Sequential(backbone, head)
    key = copy.deepcopy(query).requires_grad_(False)
    queue = F.normalize(torch.randn(a.queue, 128), dim=1)
    ptr = 0
    spec = moco_spec("v2", 32, crop_scale=(a.crop_min, 1.0))
    spec = type(spec)(**{**spec.__dict__, "jitter": (a.jitter,) * 3 + (min(0.1, a.jitter),), "grayscale_p": a.grayscale,
                             "flip_p": a.flip})
    augment = BatchAugment(spec)
    opt = torch.optim.SGD(query.parameters(), lr=a.lr, momentum=0.9, weight_decay=a.weight_decay)

    def view(x: torch.Tensor) -> torch.Tensor:
        return augment.finish(augment.crop_flip(x.float() / 255, None), None)

    @torch.no_grad()
    def keys(x: torch.Tensor) -> torch.Tensor:
        if a.bn == "plain":
            return F.normalize(key(x), dim=1)
        order = torch.randperm(len(x))  # the key batch's BN statistics come from other samples than the query's
        return F.normalize(key(x[order]), dim=1)[torch.argsort(order)]

    def info_nce(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / a.temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    start, steps, epochs, loss = time.time(), 0, 0, torch.tensor(float("nan"))
    while time.time() - start < a.budget:
        order = torch.randperm(len(images))
        for i in range(0, len(images) - a.batch + 1, a.batch):
            elapsed = time.time() - start
            if elapsed >= a.budget:
                break
            for group in opt.param_groups:
                group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * elapsed / a.budget))
            x = images[order[i : i + a.batch]]
            v1, v2 = view(x), view(x)
            with torch.no_grad():
                for pk, pq in zip(key.parameters(), query.parameters(), strict=True):
                    pk.mul_(a.momentum).add_(pq.detach(), alpha=1 - a.momentum)
            if a.symmetric:
                q1, q2 = F.normalize(query(torch.cat([v1, v2])), dim=1).chunk(2)
                k1, k2 = keys(v1), keys(v2)
                loss, new_keys = 0.5 * (info_nce(q1, k2) + info_nce(q2, k1)), torch.cat([k1, k2])
            else:
                new_keys = keys(v2)
                loss = info_nce(F.normalize(query(v1), dim=1), new_keys)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            queue[(torch.arange(len(new_keys)) + ptr) % a.queue] = new_keys
            ptr = (ptr + len(new_keys)) % a.queue
            steps += 1
        epochs += 1
        print(f"epoch {epochs}: step {steps}, loss {loss.item():.3f}, {time.time() - start:.0f} s", flush=True)
    trained = (key if a.eval_key_encoder else query)[0]
    out = {"args": vars(a), "steps": steps, "epochs": epochs, "pairs_per_s": steps * a.batch / a.budget,
           "init": at_init, "end": scores(trained, train, val), "end_recalibrated": scores(recalibrated(trained, images),
                                                                                      train, val)}
    print(f"random init (BN recalibrated): kNN {at_init['knn']:.4f}  logreg {at_init['logreg']:.4f}")
    print(f"after {a.budget:.0f} s ({steps} steps, {out['pairs_per_s']:.0f} pairs/s): kNN {out['end']['knn']:.4f}  "
          f"logreg {out['end']['logreg']:.4f}; BN recalibrated: kNN {out['end_recalibrated']['knn']:.4f}  "
          f"logreg {out['end_recalibrated']['logreg']:.4f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
