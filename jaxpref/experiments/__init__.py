"""Experiment sweeps that reproduce the paper's analyses (see `jaxpref.experiments.scaling`)."""
