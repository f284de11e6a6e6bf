"""After training: the softmax temperature and per-class logit offsets, folded into the head."""
