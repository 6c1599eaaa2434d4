"""Detection transfer on Ray Train: driver (`driver.run_detection`) and worker loop."""
