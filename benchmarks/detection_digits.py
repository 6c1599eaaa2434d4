"""Faster R-CNN on scattered-digits-det on the CPU: training / inference images/s, and AP50 against time.

Two measurements (pure torch: `detection.model`, `detection.engine`, `detection.evaluation`; no Ray, MLflow):

* `throughput`: training images/s (forward + backward + SGD step, batch --batch) and inference
  images/s of each detector variant, in alternating rounds, next to a reference measured in the same
  rounds: the bare backbone as a classifier (forward + backward + step on the same images), i.e. what
  the encoder alone costs at this image size. Also images per CPU-second (less disturbed by other
  processes on a shared machine).
* `learn`: a detector trained from random init (or --seeds of them) for --epochs, evaluated on the
  validation split before training (the untrained reference) and after every epoch: AP, AP50 (COCO
  style), VOC07 AP50, and the training seconds spent so far.

Variants (`--variants`): `c4` (trunk = stem + 2 blocks at stride 4, last block as the RoI head on 7x7
RoIAlign), `c4-roi14` (the paper's 14x14 RoIAlign), `fpn` (64-channel FPN, 256-wide MLP head),
`fpn-32` (32 channels, 128-wide head). All: 64 px canvases used as they are (min/max size 64),
small anchors, 300 proposals per image in training / 100 at test, 64 sampled RoIs per image.

Examples:
    python benchmarks/detection_digits.py throughput
    python benchmarks/detection_digits.py learn --variants fpn --epochs 4 --train-images 1000
    python benchmarks/detection_digits.py throughput --smoke     # seconds (the tests' check); also: learn --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _bench import (
    ensure_mocoray_importable,
    machine_line,
    median,
    parse_with_smoke,
    spread,
    table,
    tree_cpu_seconds,
)

ensure_mocoray_importable()

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mocoray.core.backbones import build_backbone  # noqa: E402
from mocoray.data.detection import collate_detection, scattered_digits_det  # noqa: E402
from mocoray.detection.engine import evaluate, to_model_inputs, train_one_epoch  # noqa: E402
from mocoray.detection.evaluation import coco_metrics, voc07_ap  # noqa: E402
from mocoray.detection.model import build_detector  # noqa: E402

CPU_OPTIONS = {
    "min_size": 64, "max_size": 64, "rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100, "box_batch_size_per_image": 64,
}
VARIANTS = {
    "c4": {"layout": "c4", "anchor_sizes": (16, 32), "roi_size": 7},
    "c4-roi14": {"layout": "c4", "anchor_sizes": (16, 32), "roi_size": 14},
    "fpn": {"layout": "fpn", "anchor_sizes": (8, 16, 32, 64), "fpn_channels": 64, "representation_size": 256},
    "fpn-32": {"layout": "fpn", "anchor_sizes": (8, 16, 32, 64), "fpn_channels": 32, "representation_size": 128},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["throughput", "learn"])
    p.add_argument("--arch", default="small_resnet")
    p.add_argument("--variants", default="c4,fpn", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--canvas", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: as a 1-CPU Ray worker)")
    p.add_argument("--rounds", type=int, default=5, help="throughput: alternating rounds")
    p.add_argument("--steps", type=int, default=3, help="throughput: timed training steps per variant per round")
    p.add_argument("--train-images", type=int, default=1000, help="learn: training canvases")
    p.add_argument("--val-images", type=int, default=200, help="learn: validation canvases")
    p.add_argument("--epochs", type=int, default=4, help="learn")
    p.add_argument("--lr", type=float, default=0.02, help="learn: SGD lr (momentum 0.9, wd 1e-4)")
    p.add_argument("--warmup", type=int, default=50, help="learn: linear warmup iterations")
    p.add_argument("--seeds", default="0", help="learn: comma list of init seeds")
    p.add_argument("--json", default=None, help="save the figures here")
    return parse_with_smoke(p, argv, variants="c4,fpn-32", batch=2, rounds=1, steps=1, train_images=8, val_images=4,
                            epochs=1, warmup=2)


def detector(args: argparse.Namespace, variant: str) -> torch.nn.Module:
    options = {**CPU_OPTIONS, "min_size": args.canvas, "max_size": args.canvas, **VARIANTS[variant]}
    return build_detector(args.arch, 10, **options)


def cpu_now() -> float:
    return tree_cpu_seconds(os.getpid()) or time.process_time()


def throughput(args: argparse.Namespace) -> dict:
    variants = args.variants.split(",")
    train, _ = scattered_digits_det(args.batch * (args.steps + 1), 8, canvas=args.canvas)
    batches = list(DataLoader(train, batch_size=args.batch, collate_fn=collate_detection))
    models = {v: detector(args, v) for v in variants}
    backbone, feat = build_backbone(args.arch)
    reference = torch.nn.Sequential(backbone, torch.nn.Linear(feat, 10))
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                  for name, m in {**models, "backbone": reference}.items()}

    def detector_steps(name: str, steps: list) -> None:
        train_one_epoch(models[name], optimizers[name], steps)

    def backbone_steps(steps: list) -> None:
        for images, targets, _ in steps:
            x, _ = to_model_inputs(images, None, "cpu")
            labels = torch.stack([t["labels"][0] - 1 for t in targets])  # any label: only the cost matters
            loss = torch.nn.functional.cross_entropy(reference(torch.stack(x)), labels)
            optimizers["backbone"].zero_grad()
            loss.backward()
            optimizers["backbone"].step()

    def inference(name: str) -> None:
        evaluate(models[name], batches[:1])

    jobs = {"backbone (train)": lambda: backbone_steps(batches[1:])}
    for v in variants:
        jobs[f"{v} (train)"] = lambda v=v: detector_steps(v, batches[1:])
        jobs[f"{v} (inference)"] = lambda v=v: inference(v)
    for v in variants:  # warm-up: first allocations, a first pass of the RPN with untrained weights
        detector_steps(v, batches[:1])
    backbone_steps(batches[:1])
    wall: dict[str, list[float]] = {k: [] for k in jobs}
    cpu: dict[str, list[float]] = {k: [] for k in jobs}
    order = list(jobs)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            images = args.batch * (args.steps if "train" in name else 1)
            t0, c0 = time.perf_counter(), cpu_now()
            jobs[name]()
            wall[name].append(images / (time.perf_counter() - t0))
            cpu[name].append(images / max(cpu_now() - c0, 1e-9))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {wall[k][-1]:.1f}" for k in jobs), flush=True)
    ref = median(wall["backbone (train)"])
    rows = [[k, f"{median(wall[k]):.1f}", spread(wall[k]),
             f"{ref / median(wall[k]):.1f}x" if "train" in k else "-", f"{median(cpu[k]):.1f}"] for k in jobs]
    print(table(["what", "images/s", "rounds min-max", "cost vs backbone", "images/CPU-s"], rows))
    return {k: {"images_per_s": median(wall[k]), "images_per_cpu_s": median(cpu[k])} for k in jobs}


def learn(args: argparse.Namespace) -> dict:
    train, val = scattered_digits_det(args.train_images, args.val_images, canvas=args.canvas)
    val_loader = DataLoader(val, batch_size=16, collate_fn=collate_detection)
    steps_per_epoch = -(-len(train) // args.batch)
    total = steps_per_epoch * args.epochs
    results = {}
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model = detector(args, variant)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                        momentum=0.9, weight_decay=1e-4)

            def lr_at(step: int) -> float:
                warm = min(1.0, (step + 1) / args.warmup)
                return args.lr * warm * (0.1 if step >= 0.8 * total else 1.0)  # one step down for the last fifth

            loader = DataLoader(train, batch_size=args.batch, shuffle=True, collate_fn=collate_detection,
                                generator=torch.Generator().manual_seed(seed))
            rows, spent, step = [], 0.0, 0
            for epoch in range(args.epochs + 1):
                if epoch:
                    t0 = time.perf_counter()
                    out = train_one_epoch(model, optimizer, loader, lr_at=lr_at, global_step=step)
                    spent += time.perf_counter() - t0
                    step = out.global_step
                t0 = time.perf_counter()
                predictions, truth = evaluate(model, val_loader)
                eval_s = time.perf_counter() - t0
                coco = coco_metrics(truth, predictions)
                voc = voc07_ap(truth, predictions)[0]
                rows.append({"epoch": epoch, "train_s": spent, "eval_s": eval_s, **coco, "VOC07_AP50": voc,
                             "loss": out.loss if epoch else float("nan")})
                r = rows[-1]
                print(f"{variant} seed {seed} epoch {epoch}: loss {r['loss']:.3f} AP {r['AP']:.3f} "
                      f"AP50 {r['AP50']:.3f} VOC07 AP50 {voc:.3f}  train {spent:.0f} s  eval {eval_s:.1f} s",
                      flush=True)
            results[f"{variant}/seed{seed}"] = rows
    summary = [[k, *(f"{r['AP50']:.3f}" for r in rows), f"{rows[-1]['train_s']:.0f}"] for k, rows in results.items()]
    print(table(["variant/seed", *(f"ep{e} AP50" for e in range(args.epochs + 1)), "train s"], summary))
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"{args.arch}, {args.canvas} px scattered-digits-det, batch {args.batch}, variants {args.variants}")
    out = throughput(args) if args.what == "throughput" else learn(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": out}, f, indent=2)


if __name__ == "__main__":
    main()
