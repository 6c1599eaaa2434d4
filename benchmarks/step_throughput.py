"""Pairs/s of one MoCo training step (two views), with and without the data pipeline, up to JPEG files.

Modes, all measured in the same run, in alternating rounds (the order rotates each round, so drift on
a shared machine hits every mode alike):

* `model`       : `core.moco.train_step` on pre-made view tensors already on the device: forward of
                  both encoders, backward, optimiser step, enqueue. The reference the others are
                  compared to (the `vs model` column).
* `pipeline`    : what a `data.augment=device` run does per step: uint8 batches from an in-memory
                  `TensorImages` through a DataLoader (no workers) -> to device -> `BatchAugment`
                  (two views) -> `train_step`.
* `loader:N`    : what a `data.augment=loader` run does: the per-image torchvision
                  `two_view_transform` in a DataLoader with N worker processes -> to device ->
                  `train_step`. One mode per N in `--loader-workers`.
* `augment`     : (optional) `BatchAugment.two_views` alone on a device batch: the augmentation's share.
* `jpeg-gpu:N`  : end to end from JPEG files, `data.decode=gpu`: an ImageFolder of JPEGs this script
                  writes (`--jpeg-images` photo-like images of ImageNet-like sizes, quality 90), read
                  as bytes by N loader workers (`encoded_train_dataset` + `collate_encoded`), decoded
                  and augmented on the device (`DeviceJpegAugment.two_views`) -> `train_step`.
* `jpeg-cpu:N`  : the same files, `data.decode=cpu`: PIL decoding and the torchvision per-image
                  two-view transform in N loader workers -> to device -> `train_step`.
* `jpeg-augment`: `DeviceJpegAugment.two_views` alone on one prefetched batch of file bytes.

A mode may name a model variant after `+`: `+plain` (plain BN, bn_mode none), `+split` (split BN),
`+compile` (torch.compile of both encoders, and for jpeg-* modes of the device colour/blur stage too),
e.g. `model+plain`, `model+compile`, `jpeg-gpu:4+compile`, `jpeg-augment+compile`.
Modes of the same variant share one model; the unsuffixed variant is `--bn-mode` resolved for one
worker (shuffle -> split), eager. Every variant uses `core.compiled.make_sgd` (fused SGD on CUDA).

`--version v3` times MoCo v3 instead (`core.moco_v3.build_moco_v3`: a 3-layer projection MLP for a ViT,
2 for a ResNet, a 2-layer predictor, hidden 4096 and dim 256 unless --hidden-dim / --dim say otherwise;
symmetric loss over both views, so a pair costs twice v2's forward/backward; no queue, `--queue` is
ignored). A ViT's patch projection is frozen (`core.vit.freeze_patch_embed`), as the paper's recipe.
Optimiser: AdamW (fused on CUDA) over `weight_decay_groups`, lr 1.5e-4 x batch/256, weight decay 0.1,
momentum 0.99, tau 0.2 (the paper's ViT recipe; its ResNets use LARS, whose step costs about the same).
BN modes are a v1/v2 matter (v3's heads use their own global BN and the backbone's BN stays per
worker), so `--bn-mode`, `+plain` and `+split` are refused under v3. channels_last is ignored for a ViT
(no convolution but the patch projection). The augmentation is v2's, as `core.augment.moco_spec("v3")`
gives it to the job.

Reported per mode: pairs/s (median over rounds of batch*steps/round time), the rounds' min-max,
median ms/step, the ratio to `model`, CPU milliseconds per pair and CPU cores busy (this process and
its children, loader workers included), and on CUDA the mean GPU utilisation (NVML) during the
mode's rounds. Warm-up steps (compilation, cudnn autotuning, loader start-up, first allocations; for
a mode with N workers at least 2N steps, to drain their first burst of prefetched batches) are
excluded; on CUDA every step ends with a synchronize before the clock is read.

Imports only torch/torchvision/PIL/numpy/fsspec and mocoray.core, mocoray.data (not its parquet part)
and mocoray.jobs.gpu_metrics (no Ray, MLflow, pydantic or pyarrow), so it runs on a bare GPU box:
`PYTHONPATH=platform python benchmarks/step_throughput.py --device cuda ...`.

Examples:
    python benchmarks/step_throughput.py                      # CPU, small_resnet, 32 px digits
    python benchmarks/step_throughput.py --device cuda --arch resnet50 --image-size 224 \\
        --data synthetic --batch 256 --queue 65536 --amp bf16 --channels-last \\
        --modes model,model+plain,jpeg-gpu:3,jpeg-cpu:12
    python benchmarks/step_throughput.py --device cuda --version v3 --arch vit_small_patch16_224 \\
        --image-size 224 --data synthetic --batch 256 --amp bf16 --modes model
    python benchmarks/step_throughput.py --smoke --jpeg-dir /tmp/jpeg   # seconds: the tests' check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable

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

import fsspec  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler  # noqa: E402

from mocoray.core.augment import BatchAugment, moco_spec, two_view_transform  # noqa: E402
from mocoray.core.backbones import ARCHS, build_backbone, count_macs  # noqa: E402
from mocoray.core.compiled import compile_encoders, make_sgd  # noqa: E402
from mocoray.core.moco import Encoder, MoCo, train_step  # noqa: E402
from mocoray.core.moco_v3 import build_moco_v3, weight_decay_groups  # noqa: E402
from mocoray.core.shuffle_bn import BN_MODES, resolve_bn_mode  # noqa: E402
from mocoray.core.vit import VIT_CONFIGS, freeze_patch_embed  # noqa: E402
from mocoray.data.base import SkipCorrupt, TensorImages, Transformed, collate_batch  # noqa: E402
from mocoray.data.device_decode import DeviceJpegAugment, collate_encoded, encoded_train_dataset  # noqa: E402
from mocoray.data.external import ImageFolderFS  # noqa: E402
from mocoray.data.synthetic import write_photo_folder  # noqa: E402
from mocoray.jobs.gpu_metrics import gpu_monitor  # noqa: E402

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("plain", "split", "compile")
BN_VARIANTS = ("plain", "split")
V3_LR, V3_WEIGHT_DECAY, V3_MOMENTUM, V3_TEMPERATURE = 1.5e-4, 0.1, 0.99, 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small_resnet", choices=ARCHS)
    p.add_argument("--cifar-stem", action="store_true", help="3x3/1 stem for torchvision ResNets (32 px inputs)")
    p.add_argument("--batch", type=int, default=64, help="per-process batch (pairs per step)")
    p.add_argument("--queue", type=int, default=1024, help="K (v1/v2; v3 has no queue)")
    p.add_argument("--dim", type=int, default=None, help="output dim (default 128; v3: 256)")
    p.add_argument("--hidden-dim", type=int, default=4096, help="v3: hidden width of its MLP heads")
    p.add_argument("--version", default="v2", choices=["v1", "v2", "v3"],
                   help="head (v2: MLP) and augmentation recipe; v3: MoCo v3 (see above)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--bn-mode", default=None, choices=BN_MODES,
                   help="v1/v2: requested BN-leak handling (default shuffle); resolved as for one worker "
                        "(shuffle -> split)")
    p.add_argument("--num-splits", type=int, default=8)
    p.add_argument("--data", default="digits", choices=["digits", "synthetic"],
                   help="in-memory images of model/pipeline/loader/augment: digits (32 px scattered digits, "
                        "4,314 images) or synthetic (random uint8 images at --image-size)")
    p.add_argument("--synthetic-images", type=int, default=None, help="default: 4 batches")
    p.add_argument("--jpeg-dir", default=None,
                   help="folder for the jpeg-* modes' files (default: a folder in the temp dir, kept and "
                        "reused when it already holds --jpeg-images files)")
    p.add_argument("--jpeg-images", type=int, default=None, help="JPEG files to write (default: 4 batches)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default="none", choices=list(AMP))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmul/conv on CUDA (fp32 runs)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: 1 on CPU, as a Ray worker with 1 CPU; torch's on CUDA)")
    p.add_argument("--modes", default="model,pipeline,loader",
                   help="comma list of model, pipeline, loader, augment, jpeg-gpu:N, jpeg-cpu:N, jpeg-augment, "
                        "each optionally +plain, +split, +compile")
    p.add_argument("--loader-workers", default="2", help="comma list of DataLoader worker counts for `loader`")
    p.add_argument("--rounds", type=int, default=None, help="default 8 CPU, 3 CUDA")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode per round (default 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per mode first (default 2 CPU, 5 CUDA)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the +compile variant")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    # --smoke: every CPU mode but +compile, one step each, on 8-image batches of 32 px synthetic images (v3: heads
    # 256 wide)
    args = parse_with_smoke(p, argv, batch=8, queue=64, hidden_dim=256, data="synthetic", jpeg_images=8, rounds=1,
                            steps=1, warmup=1,
                            modes="model,model+plain,pipeline,loader,augment,jpeg-gpu:0,jpeg-cpu:0,jpeg-augment",
                            loader_workers="0,1")
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (20 if cuda else 3)
    args.rounds = args.rounds or (3 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.threads = args.threads or (None if cuda else 1)
    return check_version(args)


def check_version(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the version's defaults; refuse the options that mean nothing for MoCo v3 rather than time
    something other than what was asked."""
    if args.version != "v3":
        args.dim = args.dim or 128
        args.bn_mode = args.bn_mode or "shuffle"
        return args
    bn_variants = [m for m in args.modes.split(",") if set(parse_mode(m.strip())[2]) & set(BN_VARIANTS)]
    if args.bn_mode or bn_variants:
        given = ([f"--bn-mode {args.bn_mode}"] if args.bn_mode else []) + bn_variants
        raise SystemExit(f"--version v3: BN modes do not apply (its heads use global BN, the backbone's BN stays "
                         f"per worker); drop {', '.join(given)}")
    if args.arch in VIT_CONFIGS:
        size = VIT_CONFIGS[args.arch][0]
        if args.image_size != size:
            raise SystemExit(f"--arch {args.arch} has a position embedding for {size} px: use --image-size {size}")
        if args.channels_last:
            print("--channels-last ignored: a ViT has no convolution but its patch projection")
            args.channels_last = False
    args.dim = args.dim or 256
    args.queue = None
    return args


def parse_mode(mode: str) -> tuple[str, int, frozenset[str]]:
    """'jpeg-gpu:4+compile' -> ('jpeg-gpu', 4, {'compile'})."""
    name, *variant = mode.split("+")
    kind, _, workers = name.partition(":")
    unknown = set(variant) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"mode {mode!r}: unknown variant {sorted(unknown)}; use {', '.join(VARIANTS)}")
    return kind, int(workers or 0), frozenset(variant)


def load_images(args: argparse.Namespace) -> TensorImages:
    if args.data == "digits":
        from mocoray.data.digits import scattered_digits

        return scattered_digits()[0]
    from mocoray.data.synthetic import synthetic_images

    n = args.synthetic_images or 4 * args.batch
    return synthetic_images(n, 10, args.image_size, seed=args.seed)


def jpeg_folder(args: argparse.Namespace) -> ImageFolderFS:
    """The photo-like JPEG ImageFolder (written once, reused by later runs with the same settings)."""
    n = args.jpeg_images or 4 * args.batch
    root = args.jpeg_dir or os.path.join(tempfile.gettempdir(), f"mocoray_bench_jpeg_{n}_q{args.jpeg_quality}_s{args.seed}")
    done = os.path.join(root, "done")
    if not os.path.exists(done):
        t0 = time.perf_counter()
        nbytes = write_photo_folder(root, n, quality=args.jpeg_quality, seed=args.seed,
                                    processes=min(16, os.cpu_count() or 1))
        with open(done, "w") as f:
            f.write(f"{n} files, {nbytes} bytes\n")
        print(f"wrote {n} JPEG files ({nbytes / n / 1024:.0f} KiB each on average) to {root} "
              f"in {time.perf_counter() - t0:.1f} s")
    return ImageFolderFS(fsspec.filesystem("file"), root)


def vit_macs(arch: str) -> int:
    """Multiply-adds of one ViT forward per image, by hand: `count_macs` sees each nn.Linear once per call,
    not once per token, and misses attention's fused projections and matmuls."""
    size, patch, layers, _, dim, mlp_dim = VIT_CONFIGS[arch]
    patches = (size // patch) ** 2
    tokens = patches + 1
    block = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp_dim
    return patches * 3 * patch * patch * dim + layers * block


def backbone_macs(args: argparse.Namespace, backbone: torch.nn.Module) -> int:
    return vit_macs(args.arch) if args.arch in VIT_CONFIGS else count_macs(backbone, args.image_size)


def build_v3(args: argparse.Namespace, backbone: torch.nn.Module, feat_dim: int, device: torch.device):
    """MoCo v3 with the paper's heads and its ViT optimiser (see the module docstring)."""
    vit = args.arch in VIT_CONFIGS
    if vit:
        freeze_patch_embed(backbone)
    model = build_moco_v3(backbone, feat_dim, args.dim, args.hidden_dim, 3 if vit else 2, V3_MOMENTUM,
                          V3_TEMPERATURE).to(device)
    groups = weight_decay_groups(model, V3_WEIGHT_DECAY)
    opt = torch.optim.AdamW(groups, lr=V3_LR * args.batch / 256, fused=device.type == "cuda" or None)
    return model, opt


def build(args: argparse.Namespace, device: torch.device, bn_mode: str | None, compiled: bool):
    torch.manual_seed(args.seed)
    backbone, feat_dim = build_backbone(args.arch, args.cifar_stem)
    macs = backbone_macs(args, backbone)
    if args.version == "v3":
        model, opt = build_v3(args, backbone, feat_dim, device)
    else:
        model = MoCo(Encoder(backbone, feat_dim, args.dim, mlp=args.version == "v2"), args.queue, 0.99, 0.2,
                     bn_mode, args.num_splits).to(device)
        opt = make_sgd(model.encoder_q.parameters(), 0.03, 0.9, 1e-4, device.type)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        compile_encoders(model, backend=args.compile_backend)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16" and device.type == "cuda")
    return model, opt, scaler, macs


def endless(loader: DataLoader):
    """Batches forever (epoch after epoch)."""
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
    amp_dtype = AMP[args.amp]
    default_bn = resolve_bn_mode(args.bn_mode, 1, device.type) if args.version != "v3" else None
    models: dict[tuple[str, bool], tuple] = {}

    def stepper(variant: frozenset[str]) -> Callable[[torch.Tensor, torch.Tensor], None]:
        bn = "none" if "plain" in variant else "split" if "split" in variant else default_bn
        key = (bn, "compile" in variant)
        if key not in models:
            models[key] = build(args, device, *key)
        model, opt, scaler, _ = models[key]

        def step(im_q: torch.Tensor, im_k: torch.Tensor) -> None:
            if args.channels_last:
                im_q = im_q.contiguous(memory_format=torch.channels_last)
                im_k = im_k.contiguous(memory_format=torch.channels_last)
            train_step(model, im_q, im_k, opt, scaler, amp_dtype)

        return step

    # --- the modes: each is a callable doing one full step (data included) ---
    gen = torch.Generator().manual_seed(args.seed)
    first = images.images[torch.randperm(len(images), generator=gen)[: args.batch]].to(device)
    fixed_q, fixed_k = augment.two_views(first)
    jpeg_augs = {False: DeviceJpegAugment(spec)}
    folder = None

    def loader_of(dataset, n_workers: int, collate) -> DataLoader:
        # One endless epoch of reshuffled passes: a real epoch is thousands of steps, and restarting a
        # small one every few steps would add a pipeline bubble (workers refilling) a real run never sees.
        sampler = RandomSampler(dataset, num_samples=1 << 40, generator=gen)
        return DataLoader(dataset, batch_size=args.batch, sampler=sampler, drop_last=True, num_workers=n_workers,
                          collate_fn=collate, pin_memory=cuda, persistent_workers=n_workers > 0)

    def views_from_workers(loader: DataLoader, step) -> Callable[[], None]:
        """A step on batches of two views made in loader workers."""
        it = endless(loader)

        def run() -> None:
            (v1, v2), _, _ = next(it)
            step(v1.to(device, non_blocking=True), v2.to(device, non_blocking=True))

        return run

    def views_on_device(loader: DataLoader, make_views, step) -> Callable[[], None]:
        """A step on batches whose two views `make_views` makes on the device."""
        it = endless(loader)

        def run() -> None:
            batch, _, _ = next(it)
            im_q, im_k = make_views(batch)[:2]
            step(im_q, im_k)

        return run

    def jpeg_aug(variant: frozenset[str]) -> DeviceJpegAugment:
        compiled = "compile" in variant
        if compiled not in jpeg_augs:
            jpeg_augs[compiled] = DeviceJpegAugment(spec, compile_backend=args.compile_backend)
        return jpeg_augs[compiled]

    modes: dict[str, Callable[[], None]] = {}
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in wanted:
        kind, n_workers, variant = parse_mode(mode)
        suffix = "".join(f"+{v}" for v in sorted(variant))
        if kind in ("jpeg-gpu", "jpeg-cpu", "jpeg-augment") and folder is None:
            folder = jpeg_folder(args)
        if kind == "model":
            step = stepper(variant)
            modes[mode] = lambda step=step: step(fixed_q, fixed_k)
        elif kind == "pipeline":
            modes[mode] = views_on_device(loader_of(images, 0, collate_batch),
                                          lambda x: augment.two_views(x.to(device, non_blocking=True)),
                                          stepper(variant))
        elif kind == "loader":
            for n in [int(v) for v in args.loader_workers.split(",") if v.strip()]:
                ds = Transformed(SkipCorrupt(images), two_view_transform(spec))
                modes[f"loader:{n}{suffix}"] = views_from_workers(loader_of(ds, n, collate_batch), stepper(variant))
        elif kind == "jpeg-gpu":
            loader = loader_of(encoded_train_dataset(folder), n_workers, collate_encoded)
            aug = jpeg_aug(variant)
            modes[mode] = views_on_device(loader, lambda b, aug=aug: aug.two_views(b, device), stepper(variant))
        elif kind == "jpeg-cpu":
            ds = Transformed(SkipCorrupt(folder), two_view_transform(spec))
            modes[mode] = views_from_workers(loader_of(ds, n_workers, collate_batch), stepper(variant))
        elif kind == "jpeg-augment":
            encoded = encoded_train_dataset(folder)
            batch = collate_encoded([encoded[i] for i in range(args.batch)])[0]
            aug = jpeg_aug(variant)
            modes[mode] = lambda batch=batch, aug=aug: aug.two_views(batch, device)
        elif kind == "augment":
            src = images.images[: args.batch].to(device)
            modes[mode] = lambda src=src: augment.two_views(src)
        else:
            raise SystemExit(f"unknown mode {mode!r}: use model, pipeline, loader, augment, jpeg-gpu:N, "
                             "jpeg-cpu:N, jpeg-augment")

    macs = next(iter(models.values()))[3] if models else backbone_macs(args, build_backbone(args.arch,
                                                                                         args.cifar_stem)[0])
    if args.version == "v3":
        recipe = (f"v3 (hidden {args.hidden_dim}, no queue, AdamW lr {V3_LR * args.batch / 256:.2e} wd "
                  f"{V3_WEIGHT_DECAY}, m {V3_MOMENTUM}, tau {V3_TEMPERATURE}"
                  f"{', patch projection frozen' if args.arch in VIT_CONFIGS else ''})")
    else:
        recipe = f"K {args.queue}, {args.version}, bn_mode {default_bn} (+plain: none)"
    print(f"machine: {machine_line(args.device)}")
    print(f"{args.arch} ({macs / 1e6:.0f} M MACs/image at {args.image_size} px), batch {args.batch}, "
          f"dim {args.dim}, {recipe}, amp {args.amp}, "
          f"channels_last {args.channels_last}, data {args.data}; {args.rounds} rounds x {args.steps} steps "
          f"per mode after {args.warmup} warm-up steps")

    warmup_s: dict[str, float] = {}
    for name, fn in modes.items():  # warm-up: compilation, autotuning, first allocations, loader workers start
        # A loader with N workers first delivers a burst of up to 2N prefetched batches: drain it.
        n_workers = parse_mode(name)[1]
        t0 = time.perf_counter()
        for _ in range(max(args.warmup, 2 * n_workers)):
            fn()
        sync()
        warmup_s[name] = time.perf_counter() - t0

    monitor = gpu_monitor(device, interval_s=0.1).start()
    per_round: dict[str, list[float]] = {m: [] for m in modes}
    cpu_ms: dict[str, list[float]] = {m: [] for m in modes}
    cores: dict[str, list[float]] = {m: [] for m in modes}
    gpu_util: dict[str, list[float]] = {m: [] for m in modes}
    peak_gib: dict[str, float] = {}
    step_ms: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    pid = os.getpid()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate the order every round
        for name in order:
            fn = modes[name]
            sync()
            monitor.epoch_averages()  # drop what was sampled before this mode's round (and the memory peak)
            t_round, c_round = time.perf_counter(), tree_cpu_seconds(pid)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                sync()
                step_ms[name].append((time.perf_counter() - t0) * 1e3)
            wall = time.perf_counter() - t_round
            per_round[name].append(args.batch * args.steps / wall)
            c_end = tree_cpu_seconds(pid)
            if c_round is not None and c_end is not None:
                cpu_ms[name].append((c_end - c_round) * 1e3 / (args.batch * args.steps))
                cores[name].append((c_end - c_round) / wall)
            gpu = monitor.epoch_averages()
            if "gpu_util_pct" in gpu:
                gpu_util[name].append(gpu["gpu_util_pct"])
            if "gpu_mem_peak_allocated_gib" in gpu:
                peak_gib[name] = max(peak_gib.get(name, 0.0), gpu["gpu_mem_peak_allocated_gib"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.1f}" for n in names)
              + " pairs/s", flush=True)
    monitor.stop()

    ref = median(per_round["model"]) if "model" in per_round else None
    rows, results = [], {}
    for name in names:
        pps = median(per_round[name])
        is_step = parse_mode(name)[0] not in ("augment", "jpeg-augment")
        rows.append([name, f"{pps:.1f}", f"{median(step_ms[name]):.1f}", spread(per_round[name]),
                     f"{pps / ref:.2f}x" if ref and is_step else "-",
                     f"{median(cpu_ms[name]):.2f}" if cpu_ms[name] else "-",
                     f"{median(cores[name]):.1f}" if cores[name] else "-",
                     f"{median(gpu_util[name]):.0f}" if gpu_util[name] else "-",
                     f"{peak_gib[name]:.1f}" if name in peak_gib else "-",
                     f"{warmup_s[name]:.0f}"])
        results[name] = {"pairs_per_s": pps, "ms_per_step": median(step_ms[name]), "rounds": per_round[name],
                         "cpu_ms_per_pair": median(cpu_ms[name]) if cpu_ms[name] else None,
                         "cpu_cores": median(cores[name]) if cores[name] else None,
                         "gpu_util_pct": median(gpu_util[name]) if gpu_util[name] else None,
                         "peak_gib": peak_gib.get(name), "warmup_s": warmup_s[name]}
    print(table(["mode", "pairs/s", "ms/step", "rounds min-max", "vs model", "CPU ms/pair", "cores",
                 "GPU util %", "peak GiB", "warm-up s"], rows))
    print("CPU ms/pair and cores: CPU time of this process and its children (loader workers included) per pair, "
          "and per wall second; GPU util: NVML, mean over the mode's rounds; peak GiB: torch's allocations "
          "(all models of the run); warm-up s includes compilation")
    out = {"args": vars(args), "machine": machine_line(args.device), "macs_per_image": macs, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
