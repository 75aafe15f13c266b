"""Distillation fine-tune, evaluation, BatchNorm re-estimation, the training state, distributed runs."""
