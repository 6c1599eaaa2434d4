"""Our MoCo step against lightly's MoCo building blocks, side by side on CPU, same run.

What is compared: one MoCo v2 training step on pre-made view tensors (no data loading, no
augmentation in the timed region), for the same model with the same initial weights:

* backbone: mocoray's `small_resnet` (one deep copy for each side), head: the v2 MLP
  (feat -> feat -> ReLU -> dim). Ours = `core.moco.Encoder`; lightly = `MoCoProjectionHead(feat, feat,
  dim)` loaded with the same weights.
* same batch, K, dim, momentum, temperature; the same SGD (lr 0.03, momentum 0.9, wd 1e-4) over the
  query encoder only; both queues start from the same keys (lightly's bank is overwritten with ours).
* the same shuffle-BN handling: a single-process batch shuffle of the key batch (ours:
  `bn_mode="shuffle"` at world size 1; lightly: `batch_shuffle` / `batch_unshuffle`). Plain BN on
  both sides. With `--with-split`, ours with `bn_mode="split"` (what a 1-worker run resolves to: 8
  SplitBatchNorm sub-batches) runs as a third contender, for information only.
* the same input tensors, cycled in the same order, and the same torch threads (`--threads`,
  default 1 = a Ray worker with 1 CPU).

Ours: `core.moco.train_step(MoCo(...))`. Per step it also does work lightly's recipe does not: a
finiteness check of the loss, `loss.item()`, the contrastive top-1 accuracy, and copying the BN
buffers into the key encoder. Lightly: its documented MoCo recipe (docs.lightly.ai "MoCo" example +
the MoCo tutorial's batch shuffle): `deactivate_requires_grad` on deep-copied momentum modules,
`update_momentum` for backbone and head, `NTXentLoss(temperature, memory_bank_size=(K, dim))` whose
memory bank enqueues the keys, `loss.backward(); optimizer.step(); optimizer.zero_grad()`.

Timing: warm-up steps first (and a check that both sides give the same first-step loss from the
same weights, queue and inputs), then rounds; each round times `--steps` steps of every contender,
and the order rotates (and reverses every other round) so drift on a shared machine hits all alike.
Two clocks per round: wall clock (pairs/s) and this process's CPU time (pairs per CPU-second). With
1 thread the two agree on an idle machine; on a busy one the CPU-time figure leaves out the time the
process waited for a core, so it is the steadier basis for the ratio. A control contender, a second
identical copy of ours, shows the noise floor: ours vs control should be 1.00x. Reported: median
over rounds per contender, the rounds' min-max, the best round, and ratios to lightly as the median
of the per-round ratios (plus the ratio of medians). Many short rounds (2 steps) beat a few long
ones here: a burst of load from another process then spoils a few rounds, not the median.

Needs `pip install lightly` (benchmark only; not a project dependency). `--smoke` (seconds: what the tests
run) runs without it too: then ours, the control and ours with split BN are timed against the control, and the
output says that lightly is absent.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time

from _bench import ensure_mocoray_importable, machine_line, median, parse_with_smoke, spread, table

ensure_mocoray_importable()

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mocoray.core.augment import BatchAugment, moco_spec  # noqa: E402
from mocoray.core.backbones import build_backbone  # noqa: E402
from mocoray.core.moco import Encoder, MoCo, train_step  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--queue", type=int, default=1024, help="K")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--inputs", type=int, default=4, help="distinct pre-made view batches, cycled")
    p.add_argument("--no-control", action="store_true",
                   help="leave out the control: a second, identical copy of ours (shows the noise floor)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--with-split", action="store_true", help="also time ours with bn_mode=split (information)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 steps of each side")
    p.add_argument("--seed", type=int, default=0)
    return parse_with_smoke(p, argv, batch=16, queue=64, rounds=2, steps=1, warmup=1, inputs=2, with_split=True)


class LightlyMoCo(nn.Module):
    """lightly's documented MoCo module: backbone + MoCoProjectionHead and their momentum copies."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = head
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(query)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        key = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(key).detach()


def lightly_step(model: LightlyMoCo, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 x_query: torch.Tensor, x_key: torch.Tensor, m: float) -> torch.Tensor:
    """One step of lightly's recipe (momentum update, query, shuffled key, NTXent with memory bank)."""
    from lightly.models.utils import batch_shuffle, batch_unshuffle, update_momentum

    update_momentum(model.backbone, model.backbone_momentum, m=m)
    update_momentum(model.projection_head, model.projection_head_momentum, m=m)
    query = model(x_query)
    with torch.no_grad():
        x_key, shuffle = batch_shuffle(x_key)
        key = batch_unshuffle(model.forward_momentum(x_key), shuffle)
    loss = criterion(query, key)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=1e-4)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with_lightly = importlib.util.find_spec("lightly") is not None
    if not with_lightly and not args.smoke:
        raise SystemExit("vs_lightly.py needs lightly: pip install lightly (benchmark only, not a project "
                         "dependency); --smoke runs our side and the control without it")
    if not with_lightly and args.no_control:
        raise SystemExit("without lightly the control is the reference: leave out --no-control")

    torch.manual_seed(args.seed)
    backbone, feat = build_backbone("small_resnet")
    encoder = Encoder(backbone, feat, args.dim, mlp=True)
    pristine = copy.deepcopy(encoder)  # identical starting weights for every contender

    ours = MoCo(copy.deepcopy(pristine), args.queue, args.momentum, args.temperature, bn_mode="shuffle")
    ours_opt = sgd(ours.encoder_q.parameters())

    contenders = {"ours": lambda q, k: train_step(ours, q, k, ours_opt)}
    if with_lightly:
        from lightly import __version__ as lightly_version
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead

        head = MoCoProjectionHead(feat, feat, args.dim)
        head.layers.load_state_dict(pristine.head.state_dict())  # Linear, ReLU, Linear on both sides
        theirs = LightlyMoCo(copy.deepcopy(pristine.backbone), head)
        criterion = NTXentLoss(temperature=args.temperature, memory_bank_size=(args.queue, args.dim))
        criterion.memory_bank.bank.copy_(ours.queue.keys)  # same initial negatives
        theirs_opt = sgd(list(theirs.backbone.parameters()) + list(theirs.projection_head.parameters()))
        contenders["lightly"] = lambda q, k: lightly_step(theirs, criterion, theirs_opt, q, k, args.momentum)
    if not args.no_control:
        control = MoCo(copy.deepcopy(pristine), args.queue, args.momentum, args.temperature, bn_mode="shuffle")
        control.queue.keys.copy_(ours.queue.keys)
        control_opt = sgd(control.encoder_q.parameters())
        contenders["ours (control)"] = lambda q, k: train_step(control, q, k, control_opt)
    if args.with_split:
        split = MoCo(copy.deepcopy(pristine), args.queue, args.momentum, args.temperature, bn_mode="split")
        split_opt = sgd(split.encoder_q.parameters())
        contenders["ours (split BN)"] = lambda q, k: train_step(split, q, k, split_opt)

    # Pre-made inputs: scattered-digits batches through our batch augmentation, made once.
    from mocoray.data.digits import scattered_digits

    images = scattered_digits()[0].images
    gen = torch.Generator().manual_seed(args.seed)
    aug = BatchAugment(moco_spec("v2", args.image_size))
    inputs = []
    for _ in range(args.inputs):
        idx = torch.randperm(len(images), generator=gen)[: args.batch]
        inputs.append(aug.two_views(images[idx], gen))

    # Same first step from the same weights, queue and inputs: the two compute the same thing.
    ours.train()
    q0, k0 = inputs[0]
    loss_ours = train_step(ours, q0, k0, ours_opt).loss
    if with_lightly:
        theirs.train()
        loss_theirs = float(lightly_step(theirs, criterion, theirs_opt, q0, k0, args.momentum))
        same = abs(loss_ours - loss_theirs) <= 1e-4 * max(1.0, abs(loss_ours))

    counters = dict.fromkeys(contenders, 0)

    def run(name: str, n: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) for n steps of one contender."""
        fn = contenders[name]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            q, k = inputs[counters[name] % len(inputs)]
            counters[name] += 1
            fn(q, k)
        return time.perf_counter() - t0, time.process_time() - c0

    for name in contenders:
        run(name, args.warmup)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in contenders:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run(name, 3)
            print(f"--- profile: {name} (3 steps) ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))

    print(f"machine: {machine_line()}; " + (f"lightly {lightly_version}" if with_lightly else "lightly ABSENT"))
    print(f"small_resnet + v2 MLP head, batch {args.batch}, K {args.queue}, dim {args.dim}, {args.image_size} px, "
          f"{args.threads} thread(s); {args.rounds} rounds x {args.steps} steps per side after {args.warmup} warm-up")
    if with_lightly:
        print(f"first-step loss from identical weights/queue/inputs: ours {loss_ours:.5f}, lightly {loss_theirs:.5f} "
              f"({'same' if same else 'DIFFERENT'})")
    else:
        print("lightly is not installed (pip install lightly): no comparison with it; ours and its variants are "
              "timed against the control, a second identical copy of ours")
    reference = "lightly" if with_lightly else "ours (control)"

    names = list(contenders)
    wall: dict[str, list[float]] = {n: [] for n in names}  # pairs per wall-clock second, per round
    cpu: dict[str, list[float]] = {n: [] for n in names}  # pairs per CPU second of this process
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: every side in every slot
        if r % 2:
            order = order[::-1]
        for name in order:
            w, c = run(name, args.steps)
            wall[name].append(args.batch * args.steps / w)
            cpu[name].append(args.batch * args.steps / c)

    def rel(d: dict[str, list[float]], name: str) -> list[float]:
        return [a / b for a, b in zip(d[name], d[reference], strict=True)]

    rows = []
    for name in names:
        rows.append([name, f"{median(wall[name]):.1f}", f"{median(rel(wall, name)):.3f}x",
                     f"{median(cpu[name]):.1f}", spread(cpu[name]), f"{max(cpu[name]):.1f}",
                     f"{median(rel(cpu, name)):.3f}x"])
    print(table(["implementation", "pairs/s wall", f"vs {reference}", "pairs/CPU-s", "rounds min-max", "best",
                 f"vs {reference}"], rows))
    out = {"machine": machine_line(), "lightly": lightly_version if with_lightly else None,
           "same_first_loss": same if with_lightly else None, "args": vars(args)}
    for label, d in (("wall", wall), ("cpu", cpu)):
        ratios = rel(d, "ours")
        if with_lightly:
            print(f"ours/lightly ({label}): median of per-round ratios {median(ratios):.3f} "
                  f"(rounds {min(ratios):.3f}-{max(ratios):.3f}); ratio of medians "
                  f"{median(d['ours']) / median(d['lightly']):.3f}")
        out[label] = {"pairs_per_s": {n: median(v) for n, v in d.items()}, "reference": reference,
                      "ratio": median(ratios), "ratios": ratios, "rounds": d}
    if "ours (control)" in names:
        aa = [a / b for a, b in zip(cpu["ours"], cpu["ours (control)"], strict=True)]
        print(f"noise floor: ours/control (two identical copies of ours, CPU time): median {median(aa):.3f}, "
              f"rounds {min(aa):.3f}-{max(aa):.3f}")
        out["ours_vs_control_cpu"] = median(aa)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
