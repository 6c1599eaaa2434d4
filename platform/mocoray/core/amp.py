"""Mixed precision by name: the config's `run.amp` value -> an autocast dtype and context."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, amp: str) -> AbstractContextManager:
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
