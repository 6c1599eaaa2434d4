"""Ray jobs: each module has a worker loop and a driver that builds the Ray Trainer/Tuner from config."""
