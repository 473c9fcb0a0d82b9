"""Training engine: distributed set-up, optimiser, schedule, checkpoints, train and evaluate loops."""
