"""Pairs/s of one MoCo training step (two views), with and without the data pipeline.

Modes, all measured in the same run on the same model, in alternating rounds (the order rotates each
round, so drift on a shared machine hits every mode alike):

* `model`    : `core.moco.train_step` on pre-made view tensors already on the device: forward of
               both encoders, backward, optimiser step, enqueue. The reference the others are
               compared to (the `vs model` column).
* `pipeline` : what a `data.augment=device` run does per step: uint8 batches from an in-memory
               `TensorImages` through a DataLoader (no workers) -> to device -> `BatchAugment`
               (two views) -> `train_step`.
* `loader:N` : what a `data.augment=loader` run does: the per-image torchvision
               `two_view_transform` in a DataLoader with N worker processes -> to device ->
               `train_step`. One mode per N in `--loader-workers`.
* `augment`  : (optional) `BatchAugment.two_views` alone on a device batch: the augmentation's share.

Reported per mode: pairs/s (median over rounds of batch*steps/round time), the rounds' min-max,
median ms/step, and the ratio to `model`; on CPU also pairs per CPU-second of this process tree
(loader workers included), which a busy shared machine disturbs much less than wall time. Warm-up steps (cudnn autotuning, loader start-up, first
allocations; for `loader:N` at least 2N steps, to drain the workers' first burst of prefetched
batches) are excluded; on CUDA every step ends with a synchronize before the clock is read.

Imports only torch/torchvision and mocoray.core / mocoray.data (no Ray, MLflow or pydantic), so it
runs on a bare GPU box: `PYTHONPATH=platform python benchmarks/step_throughput.py --device cuda ...`.

Examples:
    python benchmarks/step_throughput.py                      # CPU, small_resnet, 32 px digits
    python benchmarks/step_throughput.py --device cuda --arch resnet50 --image-size 224 \\
        --data synthetic --batch 256 --queue 65536 --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from _bench import ensure_mocoray_importable, machine_line, median, spread, table, tree_cpu_seconds

ensure_mocoray_importable()

import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from mocoray.core.augment import BatchAugment, moco_spec, two_view_transform  # noqa: E402
from mocoray.core.backbones import ARCHS, build_backbone, count_macs  # noqa: E402
from mocoray.core.moco import Encoder, MoCo, train_step  # noqa: E402
from mocoray.core.shuffle_bn import BN_MODES, resolve_bn_mode  # noqa: E402
from mocoray.data.base import SkipCorrupt, TensorImages, Transformed, collate_batch  # noqa: E402

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small_resnet", choices=ARCHS)
    p.add_argument("--cifar-stem", action="store_true", help="3x3/1 stem for torchvision ResNets (32 px inputs)")
    p.add_argument("--batch", type=int, default=64, help="per-process batch (pairs per step)")
    p.add_argument("--queue", type=int, default=1024, help="K")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--version", default="v2", choices=["v1", "v2"], help="head (v2: MLP) and augmentation recipe")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--bn-mode", default="shuffle", choices=BN_MODES,
                   help="requested BN-leak handling; resolved as for one worker (shuffle -> split)")
    p.add_argument("--num-splits", type=int, default=8)
    p.add_argument("--data", default="digits", choices=["digits", "synthetic"],
                   help="digits: scattered digits (32 px, 4,314 images); synthetic: random uint8 images "
                        "at --image-size")
    p.add_argument("--synthetic-images", type=int, default=None, help="default: 4 batches")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", choices=list(AMP))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmul/conv on CUDA (fp32 runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 on CPU, as a Ray worker with 1 CPU; torch's on CUDA)")
    p.add_argument("--modes", default="model,pipeline,loader",
                   help="comma list of model, pipeline, loader, augment")
    p.add_argument("--loader-workers", default="2", help="comma list of DataLoader worker counts for `loader`")
    p.add_argument("--rounds", type=int, default=None, help="default 8 CPU, 3 CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode per round (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode first (default 2 CPU, 5 CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (20 if cuda else 3)
    args.rounds = args.rounds or (3 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.threads = args.threads or (None if cuda else 1)
    return args


def load_images(args: argparse.Namespace) -> TensorImages:
    if args.data == "digits":
        from mocoray.data.digits import scattered_digits

        return scattered_digits()[0]
    from mocoray.data.synthetic import synthetic_images

    n = args.synthetic_images or 4 * args.batch
    return synthetic_images(n, 10, args.image_size, seed=args.seed)


def build(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(args.seed)
    backbone, feat_dim = build_backbone(args.arch, args.cifar_stem)
    macs = count_macs(backbone, args.image_size)
    bn_mode = resolve_bn_mode(args.bn_mode, 1, device.type)
    model = MoCo(Encoder(backbone, feat_dim, args.dim, mlp=args.version == "v2"), args.queue, 0.99, 0.2,
                 bn_mode, args.num_splits).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda")
    return model, opt, scaler, macs, bn_mode


def endless(loader: DataLoader):
    while True:
        yield from loader


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    images = load_images(args)
    spec = moco_spec(args.version, args.image_size)
    augment = BatchAugment(spec)
    model, opt, scaler, macs, bn_mode = build(args, device)
    amp_dtype = AMP[args.amp]

    def channels(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if args.channels_last else t

    def step(im_q: torch.Tensor, im_k: torch.Tensor) -> None:
        train_step(model, channels(im_q), channels(im_k), opt, scaler, amp_dtype)

    # --- the modes: each is a callable doing one full step (data included) ---
    gen = torch.Generator().manual_seed(args.seed)
    first = images.images[torch.randperm(len(images), generator=gen)[: args.batch]].to(device)
    fixed_q, fixed_k = augment.two_views(first)

    def run_model() -> None:
        step(fixed_q, fixed_k)

    modes: dict[str, Callable[[], None]] = {}
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in wanted:
        if m == "model":
            modes["model"] = run_model
        elif m == "pipeline":
            loader = DataLoader(images, batch_size=args.batch, sampler=RandomSampler(images, generator=gen),
                                drop_last=True, collate_fn=collate_batch, pin_memory=cuda)
            it = endless(loader)

            def run_pipeline(it=it) -> None:
                x, _, _ = next(it)
                im_q, im_k = augment.two_views(x.to(device, non_blocking=True))
                step(im_q, im_k)

            modes["pipeline"] = run_pipeline
        elif m == "loader":
            for n in [int(v) for v in args.loader_workers.split(",") if v.strip()]:
                ds = Transformed(SkipCorrupt(images), two_view_transform(spec))
                loader = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=n,
                                    collate_fn=collate_batch, pin_memory=cuda, persistent_workers=n > 0)
                it = endless(loader)

                def run_loader(it=it) -> None:
                    (v1, v2), _, _ = next(it)
                    step(v1.to(device, non_blocking=True), v2.to(device, non_blocking=True))

                modes[f"loader:{n}"] = run_loader
        elif m == "augment":
            src = images.images[: args.batch].to(device)

            def run_augment(src=src) -> None:
                augment.two_views(src)

            modes["augment"] = run_augment
        else:
            raise SystemExit(f"unknown mode {m!r}: use model, pipeline, loader, augment")

    print(f"machine: {machine_line(args.device)}")
    print(f"{args.arch} ({macs / 1e6:.0f} M MACs/image at {args.image_size} px), batch {args.batch}, K {args.queue}, "
          f"dim {args.dim}, {args.version}, bn_mode {bn_mode}, amp {args.amp}, channels_last {args.channels_last}, "
          f"data {args.data}; {args.rounds} rounds x {args.steps} steps per mode after {args.warmup} warm-up steps")

    for name, fn in modes.items():  # warm-up: autotuning, first allocations, loader workers start
        # A loader with N workers first delivers a burst of up to 2N prefetched batches: drain it.
        n_workers = int(name.split(":")[1]) if name.startswith("loader:") else 0
        for _ in range(max(args.warmup, 2 * n_workers)):
            fn()
        sync()

    per_round: dict[str, list[float]] = {m: [] for m in modes}
    cpu_round: dict[str, list[float]] = {m: [] for m in modes}
    step_ms: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    pid = os.getpid()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate the order every round
        for name in order:
            fn = modes[name]
            sync()
            t_round, c_round = time.perf_counter(), tree_cpu_seconds(pid)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                sync()
                step_ms[name].append((time.perf_counter() - t0) * 1e3)
            per_round[name].append(args.batch * args.steps / (time.perf_counter() - t_round))
            c_end = tree_cpu_seconds(pid)
            if c_round is not None and c_end is not None and c_end > c_round:
                cpu_round[name].append(args.batch * args.steps / (c_end - c_round))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.1f}" for n in names)
              + " pairs/s", flush=True)

    ref = median(per_round["model"]) if "model" in per_round else None
    show_cpu = not cuda and all(cpu_round.values())
    cpu_ref = median(cpu_round["model"]) if show_cpu and "model" in cpu_round else None
    rows, results = [], {}
    for name in names:
        pps = median(per_round[name])
        row = [name, f"{pps:.1f}", f"{median(step_ms[name]):.1f}", spread(per_round[name]),
               f"{pps / ref:.2f}x" if ref else "-"]
        if show_cpu:
            cps = median(cpu_round[name])
            row += [f"{cps:.1f}", f"{cps / cpu_ref:.2f}x" if cpu_ref else "-"]
        rows.append(row)
        results[name] = {"pairs_per_s": pps, "ms_per_step": median(step_ms[name]), "rounds": per_round[name],
                         "pairs_per_cpu_s": median(cpu_round[name]) if cpu_round[name] else None,
                         "cpu_rounds": cpu_round[name]}
    headers = ["mode", "pairs/s", "ms/step", "rounds min-max", "vs model"]
    if show_cpu:
        headers += ["pairs/CPU-s", "vs model"]
    print(table(headers, rows))
    if show_cpu:
        print("pairs/CPU-s: pairs per CPU-second of this process and its children (loader workers included); "
              "steadier than wall time on a shared machine")
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    out = {"args": vars(args), "machine": machine_line(args.device), "macs_per_image": macs, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
