"""wikigpt: train, evaluate and sample GPT-2-family causal LMs on WikiText-2 with the Hugging Face stack."""

import os

# Large CPU tensors (the 50,257-wide logits of every step) on transparent huge pages: far fewer page faults, 1.1-1.3x
# faster CPU training steps (docs/speed.md). torch reads this once, at its first allocation: set before torch loads.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
