"""The dictionary of negative keys: a FIFO ring buffer of L2-normalised keys."""

from __future__ import annotations

import torch
from torch import nn


class KeyQueue(nn.Module):
    """K keys of dimension `dim`, oldest overwritten first.

    K need not be a multiple of the batch size: a batch that crosses the end of the buffer is split
    and wraps around, so no key is ever dropped (except when one batch alone is larger than K, where
    only its newest K keys can fit). The keys and the write pointer are buffers, so they travel in the
    module's state_dict and a checkpoint restores the queue exactly.

    The pointer lives as a Python int (`pointer`) and is mirrored into the `ptr` buffer with a fill that
    needs no read-back: reading a device tensor on the host every step would stall a GPU's pipeline.
    Loading a state_dict sets the int from the buffer.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be >= 1, got size={size}, dim={dim}")
        # Random unit vectors until real keys arrive: the paper's initialisation.
        init = nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
        self.register_buffer("keys", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.pointer = 0

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, new_keys: torch.Tensor) -> None:
        """Write `new_keys` (B x dim, already normalised) after the newest key, wrapping around."""
        K, n = self.size, new_keys.shape[0]
        start = self.pointer
        if n > K:
            # Same result as writing the keys one by one: only the newest K survive, and they sit
            # where a one-by-one write would have put them.
            start = (start + n - K) % K
            new_keys = new_keys[-K:]
        m = new_keys.shape[0]
        new_keys = new_keys.to(dtype=self.keys.dtype)
        first = min(m, K - start)
        self.keys[start : start + first] = new_keys[:first]
        if first < m:
            self.keys[: m - first] = new_keys[first:]
        self.pointer = (start + m) % K
        self.ptr.fill_(self.pointer)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "ptr" in state_dict:
            self.pointer = int(state_dict[prefix + "ptr"])

    def ordered(self) -> torch.Tensor:
        """All keys from oldest to newest (for inspection and tests; the loss does not need order)."""
        return torch.cat([self.keys[self.pointer :], self.keys[: self.pointer]])
