"""The MoCo algorithm in pure torch: no Ray, no MLflow; every piece testable in one process."""
