"""Sampling: decoding settings, prompts, model.generate and its records."""
