"""Perplexity as eval.py reports it, the `evaluate` metric, n-gram baselines and mixtures."""
