"""Evaluation: held-out reconstruction, sampling, the digit distance, pictures."""
