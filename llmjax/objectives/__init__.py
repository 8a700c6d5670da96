"""Training objectives: pure functions of logits and batches."""
