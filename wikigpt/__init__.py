"""wikigpt: train, evaluate and sample GPT-2-family causal LMs on WikiText-2 with the Hugging Face stack."""

__version__ = "0.1.0"
