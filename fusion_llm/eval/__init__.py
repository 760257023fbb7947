"""Evaluation: the zoo's task splits and the paper's metrics."""
