"""Text to training blocks: reading and splitting WikiText, articles, block offsets."""
