"""Batch-norm layers alone: plain BN against SplitBatchNorm, at every BN shape of a ResNet, in both layouts.

Times forward (what the key encoder runs) and forward+backward (the query encoder) of one layer per
distinct (channels, height, width) of the network, weighted by how many BN layers have that shape, and
adds them up: milliseconds of BN per encoder pass at the given batch. Implementations, same run:

* `plain`          : nn.BatchNorm2d (cudnn / native kernel) in the chosen layout
* `split`          : SplitBatchNorm (channels_last input: the grouped function; NCHW: the reshape view)
* `split-reshape`  : the former SplitBatchNorm on channels_last input: the reshape to (N/G, G*C, H, W)
                     copies to NCHW and back (what made channels_last + split 2.6x slower on an H100)

Example (GPU): PYTHONPATH=platform python benchmarks/split_bn.py --device cuda --batch 256 --amp bf16
Seconds on a CPU (the tests' check of the script): python benchmarks/split_bn.py --smoke
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from _bench import ensure_mocoray_importable, machine_line, parse_with_smoke, table

ensure_mocoray_importable()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from mocoray.core.backbones import ARCHS, build_backbone  # noqa: E402
from mocoray.core.shuffle_bn import SplitBatchNorm  # noqa: E402


class ReshapeSplitBatchNorm(SplitBatchNorm):
    """The former training forward: one batch norm over an (N/G, G*C, H, W) reshape, any layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, (N, C, H, W) = self.num_splits, x.shape
        mean, var = self.running_mean.repeat(G), self.running_var.repeat(G)
        out = F.batch_norm(x.reshape(N // G, C * G, H, W), mean, var, self.weight.repeat(G), self.bias.repeat(G),
                           True, 0.1, self.eps)
        return out.view(N, C, H, W)


def bn_shapes(arch: str, image_size: int) -> Counter:
    """(C, H, W) -> number of BatchNorm2d layers of that input shape in `arch` at `image_size`."""
    net, _ = build_backbone(arch)
    shapes: Counter = Counter()
    hooks = [m.register_forward_hook(lambda m, inp, out: shapes.update([tuple(inp[0].shape[1:])]))
             for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, image_size, image_size))
    for h in hooks:
        h.remove()
    return shapes


def time_layer(layer: nn.Module, x: torch.Tensor, backward: bool, iters: int, amp: torch.dtype | None) -> float:
    """Median milliseconds of one forward (+backward) of `layer` on `x`."""
    dev = x.device
    x = x.detach().requires_grad_(backward)
    grad = torch.randn_like(x) if backward else None
    times = []
    for i in range(iters + 3):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None), torch.set_grad_enabled(backward):
            out = layer(x)
        if backward:
            out.backward(grad)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=ARCHS)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-splits", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    p.add_argument("--iters", type=int, default=10)
    args = parse_with_smoke(p, argv, arch="small_resnet", image_size=32, batch=16, iters=1, amp="none")
    dev = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shapes = bn_shapes(args.arch, args.image_size)
    print(f"machine: {machine_line(args.device)}")
    print(f"{args.arch} at {args.image_size} px: {sum(shapes.values())} BN layers, {len(shapes)} shapes; batch "
          f"{args.batch}, {args.num_splits} splits, amp {args.amp}; ms per encoder pass (median of {args.iters})")
    impls = {"plain": lambda c: nn.BatchNorm2d(c), "split": lambda c: SplitBatchNorm(c, args.num_splits),
             "split-reshape": lambda c: ReshapeSplitBatchNorm(c, args.num_splits)}
    rows = []
    for layout in ("channels_last", "nchw"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for name, make in impls.items():
            if name == "split-reshape" and layout == "nchw":
                continue  # on NCHW input `split` is this already
            fwd = both = 0.0
            for (c, h, w), count in shapes.items():
                layer = make(c).to(dev).train()
                # activations arrive in bf16/fp16 under autocast (conv outputs)
                x = torch.randn(args.batch, c, h, w, device=dev, dtype=amp or torch.float32).contiguous(memory_format=fmt)
                fwd += count * time_layer(layer, x, False, args.iters, amp)
                both += count * time_layer(layer, x, True, args.iters, amp)
            rows.append([f"{name} ({layout})", f"{fwd:.2f}", f"{both:.2f}"])
    print(table(["BN implementation (layout)", "forward ms", "forward+backward ms"], rows))


if __name__ == "__main__":
    main()
