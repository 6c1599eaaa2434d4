"""Faster step pieces: torch.compile of the two encoders, and the optimiser's multi-tensor kernels.

What is compiled: the forward of `encoder_q` (its backward follows through AOTAutograd) and of
`encoder_k` (always called under no_grad, so one inference graph). `nn.Module.compile` compiles in
place, so `state_dict` keys, checkpoints, DDP wrapping and `momentum_update` see the same modules.

What is not: `MoCo.forward`'s key shuffle (all-gathers, a broadcast, `randperm`), the queue (its write
pointer is a Python int) and `train_step` (one host sync, the optimiser step). Collectives and
host syncs inside a graph would break it into pieces or bake in values; left outside, every compiled
graph is a pure tensor program that runs the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .moco import MoCo


def compile_encoders(model: MoCo, backend: str = "inductor", mode: str | None = None) -> MoCo:
    """Compile `model.encoder_q` and `model.encoder_k` in place (first call of each pays the compile time).

    Call before wrapping the model in DDP; channels_last conversion may come before or after. `backend`
    "aot_eager" traces and runs the same graphs without generating kernels (what CPU tests use).
    """
    model.encoder_q.compile(backend=backend, mode=mode)
    model.encoder_k.compile(backend=backend, mode=mode)
    return model


def make_sgd(
    params: Iterable[torch.nn.Parameter], lr: float, momentum: float, weight_decay: float, device_type: str
) -> torch.optim.SGD:
    """SGD with one fused kernel for all parameters on CUDA (GradScaler-aware), multi-tensor elsewhere.

    The update equals the per-parameter SGD's up to float rounding.
    """
    if device_type == "cuda":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
