"""The training side of comm: Accelerate loop, optimizers, checkpoints, trackers."""
