"""What a run shows: the model card, plots, the Hub push and the demo."""
