"""Trainers, data streams, checkpoints and the training loop (see :mod:`featinv.training.loop`)."""
