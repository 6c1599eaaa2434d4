"""A sweep's search space and scheduler as Ray Tune objects, and how many trials the cluster fits at once."""

from __future__ import annotations

import math
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ...config import PretrainConfig, SweepConfig
from ...config.sweep import is_int_field, max_epochs


def tune_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune param_space: dotted field name -> Tune domain."""
    space: dict[str, Any] = {}
    for key, spec in sweep.space.items():
        if spec.kind == "grid":
            space[key] = tune.grid_search(spec.values)
        elif spec.kind == "choice":
            space[key] = tune.choice(spec.values)
        else:
            low, high = spec.bounds
            if spec.kind == "randint" or is_int_field(key):  # integer field: integer samples, high included
                sampler = tune.lograndint if spec.kind == "loguniform" else tune.randint
                space[key] = sampler(int(low), int(high) + 1)
            else:
                space[key] = (tune.loguniform if spec.kind == "loguniform" else tune.uniform)(low, high)
    return space


def build_scheduler(sweep: SweepConfig):
    s = sweep.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # time_attr=epoch (not training_iteration): a restarted trial continues at its own epoch.
    # stop_last_trials=False: a trial that reaches max_t finishes on its own (run closed, backbone exported).
    return ASHAScheduler(time_attr="epoch", max_t=s.max_t or max_epochs(sweep), grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, stop_last_trials=False)


def _space_values(sweep: SweepConfig, field: str) -> list[Any]:
    """Grid/choice values or the two range ends of a searched field; [] when it is not searched."""
    spec = sweep.space.get(field)
    return spec.values if spec is not None else []


def _largest(sweep: SweepConfig, field: str, base_value: float) -> float:
    return max([base_value, *_space_values(sweep, field)])


def concurrency(sweep: SweepConfig, base: PretrainConfig) -> int:
    """Trials at once: what the user asked for, else as many as the cluster fits (driver + workers each).

    Tune only reserves each trial's driver; the workers' placement group comes later from Ray Train.
    Letting Tune start more trials than fit would park every trial's workers forever. A searched
    run.num_workers / cpus_per_worker / gpus_per_worker counts at its largest value, so the biggest
    trial fits alongside the others.
    """
    import ray

    run = base.run
    workers = _largest(sweep, "run.num_workers", run.max_workers)
    per_cpu = sweep.resources.trial_cpus + workers * _largest(sweep, "run.cpus_per_worker", run.cpus_per_worker)
    uses_gpu = run.use_gpu or any(bool(v) for v in _space_values(sweep, "run.use_gpu"))
    per_gpu = workers * _largest(sweep, "run.gpus_per_worker", run.gpus_per_worker) if uses_gpu else 0.0
    total = ray.cluster_resources()
    fits = math.floor(total.get("CPU", 0.0) / per_cpu + 1e-9)
    if per_gpu:
        fits = min(fits, math.floor(total.get("GPU", 0.0) / per_gpu + 1e-9))
    need = f"{per_cpu:g} CPU" + (f" + {per_gpu:g} GPU" if per_gpu else "")
    if fits < 1:
        print(f"[mocoray] warning: one trial needs {need} (resources.trial_cpus + workers); the cluster has "
              f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU: trials will wait for more nodes")
        fits = 1
    if sweep.max_concurrent_trials is None:
        return fits
    if sweep.max_concurrent_trials > fits:
        print(f"[mocoray] warning: max_concurrent_trials={sweep.max_concurrent_trials} but only {fits} trial(s) "
              f"of {need} fit the cluster now; the others' workers will wait")
    return sweep.max_concurrent_trials
