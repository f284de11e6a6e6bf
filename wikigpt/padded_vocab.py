"""Vocabulary padding: the embedding and LM head rounded up to a multiple of N (e.g. 64); the tokenizer is unchanged.

GPT-2's LM head (768 x 50257) is the largest matmul in the model, and 50257 is odd: GPU matmul kernels run on
full tiles only when the width is a multiple of 64/128, so nanoGPT pads it to 50304. The padded ids are never
produced by the tokenizer, and here they are sliced off the logits right after the LM head: the loss, perplexity
and sampling see exactly the real vocabulary, padded ids get no probability mass and no gradient (their weight
rows start at zero and stay zero).

A saved folder keeps the padded shapes and records `real_vocab_size` in config.json; `wikigpt.model.load_causal_lm`
(train.py, eval.py, generate.py) puts the slice back. A plain `AutoModelForCausalLM.from_pretrained` loads the folder
too (it ignores the extra key): its logits then have the padded width with 0 in the padded columns, and the saved
generation_config.json suppresses the padded ids, so its `generate` never emits one either.
"""

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from .errors import UsageError

REAL_VOCAB_KEY = "real_vocab_size"  # config.json field: tokenizer-sized vocabulary inside the padded matrices
FLAG = "--pad_vocab_multiple"


def check_pad_vocab_args(multiple: int | None, model_name_or_path: str | None) -> None:
    if multiple is None:
        return
    if multiple <= 0:
        raise UsageError(f"{FLAG} must be a positive integer such as 64 or 128; got {multiple}. "
                         f"Pass e.g. {FLAG} 64, or leave it out for no padding")
    if model_name_or_path:
        raise UsageError(f"{FLAG} only applies to a model built from scratch (a checkpoint keeps its own "
                         f"vocabulary size); drop it, or drop --model_name_or_path")


def padded_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def real_vocab_size(config) -> int | None:
    """The tokenizer-sized vocabulary of a padded model, or None when the model is not padded."""
    real = getattr(config, REAL_VOCAB_KEY, None)
    return real if isinstance(real, int) and 0 < real < config.vocab_size else None


def pad_vocab(model, multiple: int):
    """Pad a freshly built model's token embedding (and tied LM head) with zero rows to a multiple of `multiple`.

    The real rows keep their initial values, so a padded model starts from the same weights as an unpadded one.
    """
    real = model.config.vocab_size
    padded = padded_size(real, multiple)
    if padded == real:
        return model  # already a multiple: nothing to slice
    model.resize_token_embeddings(padded, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[real:].zero_()
        head = model.get_output_embeddings()
        if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            head.weight[real:].zero_()  # untied head
    setattr(model.config, REAL_VOCAB_KEY, real)
    # For plain from_pretrained + generate, which cannot know about the slice.
    model.generation_config.suppress_tokens = list(range(real, padded))
    return use_real_vocab(model)


def real_vocab_loss(logits, labels, vocab_size=None, **kwargs):
    """The model's causal-LM loss over the logits it returns (real vocabulary), not config.vocab_size columns."""
    return ForCausalLMLoss(logits.float().contiguous(), labels, vocab_size=logits.shape[-1], **kwargs)


def use_real_vocab(model):
    """If the config says the vocabulary is padded, slice the LM head's output to the real vocabulary (idempotent)."""
    real = real_vocab_size(model.config)
    head = model.get_output_embeddings()
    if real is None or head is None or getattr(model, "_real_vocab_hook", None) is not None:
        return model

    def keep_real_columns(module, inputs, logits):
        return logits[..., :real]

    model._real_vocab_hook = head.register_forward_hook(keep_real_columns)
    model.loss_function = real_vocab_loss
    return model
