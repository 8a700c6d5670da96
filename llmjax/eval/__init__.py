"""Evaluation: jit-safe metric sums (metrics.py), LM choice scoring (scoring.py), `llmjax eval`."""
