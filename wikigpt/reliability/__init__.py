"""Faults: complete checkpoints, preemption, NaN/inf guard, failed writes."""
