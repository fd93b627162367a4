"""Evaluation: metrics, per-task evaluation of a model, evaluating run folders, result reports."""
