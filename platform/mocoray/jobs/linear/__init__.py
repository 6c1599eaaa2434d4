"""Linear evaluation on Ray Train: driver (`driver.run_linear_eval`), worker loop, frozen features."""
