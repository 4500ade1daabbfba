"""Evaluation: the shared scorer, the trainer's evaluator, calibration, temperature and plots."""
