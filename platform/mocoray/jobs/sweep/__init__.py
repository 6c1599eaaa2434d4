"""Ray Tune sweeps over pretraining fields (K, m, tau first): space + scheduler, the report, the driver."""

from .driver import SweepFailed, SweepResult, load_sweep_dir, run_sweep, run_trial
from .report import trial_run_name
from .space import concurrency, tune_space

__all__ = ["SweepFailed", "SweepResult", "concurrency", "load_sweep_dir", "run_sweep", "run_trial",
           "trial_run_name", "tune_space"]
