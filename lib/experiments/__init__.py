"""Experiment plumbing: one module per notebook (baselines, fs_merge, gradient_matching) plus the
shared pieces they use (tracks, training, evaluation, selection, findings, cache, run records).

Algorithms (``lib.merging``, ``lib.statistics``, ``lib.fs_merge``, ...) never import from here."""
