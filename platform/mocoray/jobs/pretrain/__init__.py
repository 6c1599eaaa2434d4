"""MoCo pretraining on Ray Train: driver (`driver.run_pretrain`), worker loop, monitor, checkpoint state."""
