"""One training run: arguments, the Trainer subclass, optimizers, budgets, precision, search."""
