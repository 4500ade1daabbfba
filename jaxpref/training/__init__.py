"""Training: the loop, its config, state, data, workdir layout and metrics."""
