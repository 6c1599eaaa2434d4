"""Per-epoch GPU metrics: averaging over an injected sampler, and the no-GPU path."""

import itertools
import time

import torch

from conftest import wait_until
from mocoray.jobs.gpu_metrics import GpuMonitor, gpu_monitor


def test_epoch_averages_are_means_of_the_samples_since_the_previous_call():
    readings = iter([{"gpu_util_pct": 90.0, "gpu_mem_used_gib": 10.0},
                     {"gpu_util_pct": 60.0, "gpu_mem_used_gib": 12.0},
                     {"gpu_util_pct": 30.0},  # a reading without memory: that mean uses the others
                     {"gpu_util_pct": 100.0, "gpu_mem_used_gib": 20.0}])
    monitor = GpuMonitor(lambda: next(readings))
    for _ in range(3):
        monitor.sample_once()
    assert monitor.epoch_averages() == {"gpu_util_pct": 60.0, "gpu_mem_used_gib": 11.0}
    monitor.sample_once()
    assert monitor.epoch_averages() == {"gpu_util_pct": 100.0, "gpu_mem_used_gib": 20.0}
    assert monitor.epoch_averages() == {}  # nothing sampled since


def test_a_failing_reading_is_dropped_and_sampling_goes_on():
    calls = itertools.count()

    def flaky():
        if next(calls) % 2:
            raise RuntimeError("NVML hiccup")
        return {"gpu_util_pct": 50.0}

    monitor = GpuMonitor(flaky)
    for _ in range(4):
        monitor.sample_once()
    assert monitor.epoch_averages() == {"gpu_util_pct": 50.0}


def test_background_thread_samples_until_stopped():
    readings: list[float] = []

    def sample():
        readings.append(float(len(readings)))
        return {"gpu_util_pct": readings[-1]}

    with GpuMonitor(sample, interval_s=0.01) as monitor:
        wait_until(lambda: len(readings) >= 3, 120, "the monitor's thread took fewer than 3 readings")
    n = len(readings)
    assert monitor.epoch_averages() == {"gpu_util_pct": sum(readings) / n}
    time.sleep(0.05)
    assert len(readings) == n  # stopped: no more readings


def test_without_a_gpu_the_monitor_starts_nothing_and_reports_nothing():
    monitor = gpu_monitor(torch.device("cpu")).start()
    assert not monitor.enabled and monitor._thread is None
    monitor.sample_once()
    assert monitor.epoch_averages() == {}
    monitor.stop()
    if not torch.cuda.is_available():
        assert not gpu_monitor("cuda").enabled
