"""Training: the accelerate loop, one optimiser step, batching, losses and balancing, checkpoints, telemetry."""
