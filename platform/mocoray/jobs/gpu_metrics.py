"""GPU utilisation and memory, sampled in a background thread and averaged per epoch (for MLflow).

`gpu_monitor(device).start()` samples the training process's GPU every `interval_s` through NVML
(the driver's `libnvidia-ml.so.1`, called with ctypes: no Python package needed). Each
`epoch_averages()` returns the means since the previous call plus the epoch's peak of memory allocated
by torch, as `gpu_util_pct`, `gpu_mem_used_gib`, `gpu_mem_peak_allocated_gib`. On a device that is
not CUDA it starts no thread and returns {}; without NVML it reports memory only (from torch).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Sample = dict[str, float]
GIB = 2**30


class GpuMonitor:
    """Calls `sample()` every `interval_s` seconds in a daemon thread; `epoch_averages` drains the samples."""

    def __init__(self, sample: Callable[[], Sample] | None, interval_s: float = 1.0,
                 device: torch.device | None = None) -> None:
        self._sample, self.interval_s, self.device = sample, interval_s, device
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._sample is not None

    def sample_once(self) -> None:
        if self._sample is None:
            return
        try:
            sample = self._sample()
        except Exception as err:  # a flaky reading must not end training
            log.debug("GPU sample failed: %s", err)
            return
        with self._lock:
            self._samples.append(sample)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample_once()

    def start(self) -> GpuMonitor:
        if self._sample is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def epoch_averages(self) -> dict[str, float]:
        """Mean of each quantity over the samples since the last call (which are then dropped)."""
        with self._lock:
            samples, self._samples = self._samples, []
        out: dict[str, float] = {}
        for key in sorted({k for s in samples for k in s}):
            values = [s[key] for s in samples if key in s]
            out[key] = sum(values) / len(values)
        if self.device is not None and self.device.type == "cuda":
            out["gpu_mem_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / GIB
            torch.cuda.reset_peak_memory_stats(self.device)
        return out

    def __enter__(self) -> GpuMonitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Utilization(ctypes.Structure):
    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def nvml_sampler(device: torch.device) -> Callable[[], Sample] | None:
    """A sampler reading `device`'s utilisation and memory from NVML, or None where NVML is missing.

    The GPU is found by UUID, so it is the right one whatever CUDA_VISIBLE_DEVICES renumbers."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}".encode()
        handle = ctypes.c_void_p()
        if nvml.nvmlDeviceGetHandleByUUID(ctypes.c_char_p(uuid), ctypes.byref(handle)) != 0:
            return None
    except (OSError, AttributeError, RuntimeError) as err:
        log.info("NVML unavailable (%s): GPU utilisation will not be logged", err)
        return None

    def sample() -> Sample:
        util, mem = _Utilization(), _Memory()
        out: Sample = {}
        if nvml.nvmlDeviceGetUtilizationRates(handle, ctypes.byref(util)) == 0:
            out["gpu_util_pct"] = float(util.gpu)
        if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) == 0:
            out["gpu_mem_used_gib"] = mem.used / GIB
        return out

    return sample


def torch_memory_sampler(device: torch.device) -> Callable[[], Sample]:
    """Device-wide memory in use, from the CUDA runtime (no utilisation without NVML)."""

    def sample() -> Sample:
        free, total = torch.cuda.mem_get_info(device)
        return {"gpu_mem_used_gib": (total - free) / GIB}

    return sample


def gpu_monitor(device: torch.device | str, interval_s: float = 1.0) -> GpuMonitor:
    """A monitor of `device` (not yet started); one that does nothing unless it is a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return GpuMonitor(None, interval_s)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return GpuMonitor(nvml_sampler(device) or torch_memory_sampler(device), interval_s, device)
