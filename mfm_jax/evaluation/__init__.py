"""Evaluation: metrics, whole/slide inference, pictures of predictions."""
