"""Training: typed configs, the train state and step, the loop, the workdir and its checkpoints."""
