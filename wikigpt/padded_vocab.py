"""Vocabulary padding: the LM head's matmul runs N-wide (e.g. 64), the weights and the tokenizer
keep their size.

GPT-2's LM head (768 x 50257) is the largest matmul in the model, and 50257 is odd: GPU matmul
kernels run on full tiles only when the width is a multiple of 64/128, so nanoGPT pads it to 50304.
Here the padding exists only inside the head's forward: the (tied) weight is zero-padded to 50304
rows for the matmul and the logits are sliced back to 50257 right after it. The parameters,
config.json, checkpoints and the saved model keep the real vocabulary, so a plain
`AutoModelForCausalLM.from_pretrained` (lm-eval, pipelines, the Hub widget) sees exactly the model
train.py and eval.py score, and resuming needs nothing special. The loss, perplexity and sampling
see the real vocabulary only; the padded ids do not exist outside the matmul.
"""

from types import MethodType

import torch
import torch.nn.functional as F

from wikigpt.errors import UsageError

FLAG = "--pad_vocab_multiple"


def check_pad_vocab_args(multiple: int | None, model_name_or_path: str | None) -> None:
    if multiple is None:
        return
    if multiple <= 0:
        raise UsageError(
            f"{FLAG} must be a positive integer such as 64 or 128; got {multiple}. "
            f"Pass e.g. {FLAG} 64, or leave it out for no padding"
        )
    if model_name_or_path:
        raise UsageError(
            f"{FLAG} only applies to a model built from scratch (a checkpoint keeps its own "
            f"vocabulary size); drop it, or drop --model_name_or_path"
        )


def padded_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def head_weight(head: torch.nn.Linear) -> torch.Tensor:
    """The LM head's weight as its matmul uses it: zero-padded to the padded width when the model is
    padded."""
    extra = getattr(head, "_padded_rows", 0)
    return F.pad(head.weight, (0, 0, 0, extra)) if extra else head.weight


def head_width(model) -> int:
    """Columns of the LM head's matmul: the padded vocabulary when padded, else the vocabulary."""
    head = model.get_output_embeddings()
    return head.out_features + getattr(head, "_padded_rows", 0)


def _padded_head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
    # The matmul is padded-width (full GPU tiles); the padded columns are dropped before anyone sees
    # them.
    return F.linear(hidden, head_weight(self), self.bias)[..., : self.out_features]


def pad_vocab(model, multiple: int):
    """Run the model's LM-head matmul at the vocabulary rounded up to a multiple of `multiple` (in
    memory only).

    Nothing about the weights changes: the model computes the same logits, and saves and loads as
    before.
    """
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear):
        raise UsageError(
            f"{FLAG} needs a model whose LM head is a plain linear layer (GPT-2); drop {FLAG}"
        )
    extra = padded_size(head.out_features, multiple) - head.out_features
    if extra:
        head._padded_rows = extra
        head.forward = MethodType(_padded_head_forward, head)
    return model
