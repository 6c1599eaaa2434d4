"""mocoray: MoCo self-supervised pretraining on Ray Train, sweeps on Ray Tune, lineage in MLflow."""

__version__ = "0.1.0"
