"""--tie_tokens_below K: tokens the training data holds fewer than K times share one embedding row.

A small model on a small corpus spends most of its compute in the LM head: at 8 x 128 on WikiText-2 the
50,257-wide head is ~75% of a training step's FLOPs, while the training split holds only ~17,400 distinct tokens.

K = 1 ties the tokens the training data never contains. In full-softmax training their rows only ever get the
same push down (sum over positions of p(u) * h) and nothing else, so tying them changes what the model can learn
in nothing that the data could teach it, and the training loss no longer needs their logits one by one: it
computes logits for the kept tokens plus one column for the shared row, h . e_shared + log(n_tied), which is the
log-sum-exp of the n equal tied logits. That is 2.9x narrower on WikiText-2, and 1.5x faster CPU steps.

K = 2 or more also ties the rare tokens (seen once, ...): they become one class whose probability the model
learns from their occurrences, spread evenly over its members. That is how word-level LMs learn <unk>, and it
is what a model needs to give a sensible probability to tokens it has never seen: every token that first shows
up in held-out or test text is a member of the class. Without it (K = 1), no training target ever belongs to the
shared row, so training pushes its probability down for ever, and every unseen test token costs more each epoch.

The shared row is one parameter: the training forward maps tied input ids to it and the loss reaches it through
the shared column, so its gradient is the sum of every use. After each optimizer step the other tied rows are set
to it again (weight decay alone moved them), so the saved, evaluated or sampled model is a plain GPT2LMHeadModel
whose full 50,257-way softmax gives exactly the probabilities the training loss used: a tied token gets
p(shared class) / n_tied. From scratch only: a pretrained checkpoint's rows carry what it learned.
With --chunked_loss_size the narrow head's loss and gradients are computed in chunks (wikigpt.chunked_loss).
With --tied_input_dropout P each training input token reads the shared row with probability P (the targets stay):
new text holds more unknown tokens than the training text, and the model learns to read such contexts.

Equal rows cannot tell rare tokens apart: a new article repeats names the training text never held, and a model
whose rare tokens all read the same row cannot see which one it has just read. With --tied_identity_std S each
tied row is the shared row plus a fixed random vector of the token's own (N(0, S^2), in the last half of the
coordinates): the model can copy a rare token it has read, and the saved model is still a plain GPT-2 whose full
softmax gives each tied token its own probability. The training head then holds the tied tokens among the batch's
targets and a random sample of the others, which stands for the rest of the class. The training text alone
teaches little copying (a token seen at most twice is rarely repeated within a block), so --tied_rename_prob Q
renames, in each training block, tokens it repeats that are rare enough in the training data to a random tied
token, everywhere in the block: a new name, repeated, as in a new article.
"""

import logging
import math

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, TrainerCallback

from .chunked_loss import ChunkedLinearCrossEntropy
from .errors import UsageError
from .training_loss import replace_training_loss

logger = logging.getLogger(__name__)

FLAG = "--tie_tokens_below"
DROPOUT_FLAG = "--tied_input_dropout"
IGNORE_INDEX = -100
IDENTITY_FLAG = "--tied_identity_std"
RENAME_FLAG = "--tied_rename_prob"
RENAME_BELOW = 100  # --tied_rename_prob renames tokens the training data holds fewer times (names, rare words)
CLASS_SAMPLES = 512  # --tied_identity_std: tied rows drawn per training step to estimate the class's partition sum


def check_tied_tokens_args(args) -> None:
    below, dropout = args.tie_tokens_below, args.tied_input_dropout
    identity_std, rename_prob = args.tied_identity_std, args.tied_rename_prob
    if not 0 <= dropout < 1:
        raise UsageError(f"{DROPOUT_FLAG} is the probability that a training input token reads the shared row, "
                         f"0 or more and below 1 (e.g. 0.05); got {dropout}")
    if not 0 <= identity_std < math.inf:
        raise UsageError(f"{IDENTITY_FLAG} is the spread of each rare token's identity vector, 0 (off) or more "
                         f"(e.g. 0.1); got {identity_std}")
    if not 0 <= rename_prob <= 1:
        raise UsageError(f"{RENAME_FLAG} is the probability that a repeated token of a training block is renamed, "
                         f"from 0 to 1 (e.g. 0.35); got {rename_prob}")
    if rename_prob and not identity_std:
        raise UsageError(f"{RENAME_FLAG} teaches the model to copy rare tokens, which it can only tell apart with "
                         f"identity vectors: add {IDENTITY_FLAG} S (e.g. 0.1), or drop {RENAME_FLAG}")
    if below is None:
        for flag, value in ((DROPOUT_FLAG, dropout), (IDENTITY_FLAG, identity_std)):
            if value:
                raise UsageError(f"{flag} acts on the rare tokens that {FLAG} ties: add {FLAG} K (e.g. 3), or "
                                 f"drop {flag}")
        return
    if below < 1:
        raise UsageError(f"{FLAG} is a count of occurrences in the training data, 1 or more (1: only the tokens it "
                         f"never contains; 2: also those it holds once); got {below}")
    if args.model_name_or_path:
        raise UsageError(f"{FLAG} only applies to a model built from scratch (a checkpoint's embedding rows hold "
                         f"what it learned); drop {FLAG}, or drop --model_name_or_path")


def training_token_counts(train_set, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the training data (re-cut blocks' stream, or the fixed blocks)."""
    ids = getattr(train_set, "ids", None)  # wikigpt.block_offsets.RandomOffsetBlocks keeps the whole stream
    if ids is None:
        ids = pc.list_flatten(train_set.with_format("arrow")[:]["input_ids"]).to_numpy()
    return np.bincount(ids, minlength=vocab_size)


class TiedTokens:
    """Kept and tied ids, each id's column in the narrow head, and each id's row in the training forward.

    `identity_std` (--tied_identity_std): each tied row is the shared row plus the id's own fixed random vector (in the
    last half of the coordinates, N(0, identity_std^2) each; none for the shared id), so the model can tell rare
    tokens apart and copy one it has read. `rename_prob` (--tied_rename_prob): see rename().
    """

    def __init__(self, counts: np.ndarray, below: int, input_dropout: float = 0.0, identity_std: float = 0.0,
                 n_embd: int = 0, rename_prob: float = 0.0):
        tied = np.flatnonzero(counts < below)
        self.below, self.input_dropout, self.rename_prob = below, input_dropout, rename_prob
        self.kept = torch.as_tensor(np.flatnonzero(counts >= below), dtype=torch.long)
        self.tied = torch.as_tensor(tied, dtype=torch.long)
        self.shared = int(tied[0])  # the row that stands for all of them
        self.log_n = math.log(len(tied))
        self.column = torch.full((len(counts),), len(self.kept), dtype=torch.long)
        self.column[self.kept] = torch.arange(len(self.kept))
        self.row = torch.arange(len(counts))
        self.row[self.tied] = self.shared
        self.is_tied = torch.as_tensor(counts < below)
        self.renamable = torch.as_tensor((counts >= below) & (counts < RENAME_BELOW))
        self.identity = None
        if identity_std:
            # a fixed seed: a resumed run and every rank deal the same vectors
            half = n_embd // 2
            self.identity = torch.zeros(len(counts), n_embd)
            self.identity[self.tied, n_embd - half:] = identity_std * torch.randn(
                len(tied), half, generator=torch.Generator().manual_seed(0))
            self.identity[self.shared] = 0

    @torch.no_grad()
    def tie(self, weight: torch.Tensor) -> None:
        tied = self.tied.to(weight.device)
        weight[tied] = weight[self.shared].clone()
        if self.identity is not None:
            weight[tied] += self.identity[self.tied].to(weight)

    def rename(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """--tied_rename_prob q: in each training block, each token that occurs twice or more in it and fewer than
        RENAME_BELOW times in the training data becomes, with probability q, a random tied token, everywhere in the
        block (inputs and targets). New articles bring names the training text never held and repeat them; renamed
        blocks teach the model to copy a rare token it has read."""
        renamed = input_ids.clone()
        renamable, tied = self.renamable.to(input_ids.device), self.tied.to(input_ids.device)
        for block in renamed:
            ids, counts = torch.unique(block, return_counts=True)
            chosen = ids[(counts > 1) & renamable[ids] & (torch.rand(len(ids), device=ids.device) < self.rename_prob)]
            if len(chosen):
                new = tied[torch.randint(len(tied), (len(chosen),), device=ids.device)]
                where = torch.searchsorted(chosen, block).clamp_max(len(chosen) - 1)
                block.copy_(torch.where(chosen[where] == block, new[where], block))
        return renamed, torch.where(labels == input_ids, renamed, labels)

    def head(self, weight: torch.Tensor, targets: torch.Tensor):
        """The narrow head's rows, its columns for `targets` (-100 stays) and the log of how many tokens each of its
        last `tail` columns stands for: (head, columns, tail_offset, tail).

        Equal tied rows: the kept rows and the shared row, whose column stands for all n tied tokens. With identity
        vectors: the kept rows, the rows of the tied tokens among the targets, and CLASS_SAMPLES rows drawn at random
        from the tied ones, each standing for n / CLASS_SAMPLES of them (an unbiased estimate of the rest of the
        class's sum of exp(logit); the saved model's full softmax sums all of them)."""
        device, valid = targets.device, targets != IGNORE_INDEX
        if self.identity is None:
            rows = torch.cat([self.kept, torch.tensor([self.shared])]).to(weight.device)
            columns = torch.where(valid, self.column.to(device)[targets.clamp_min(0)], IGNORE_INDEX)
            return weight.index_select(0, rows), columns, self.log_n, 1
        safe = targets.clamp_min(0)
        is_tied = valid & self.is_tied.to(device)[safe]
        present = torch.unique(targets[is_tied])
        sampled = self.tied[torch.randint(len(self.tied), (CLASS_SAMPLES,))].to(device)
        tied_ids = torch.cat([present, sampled])
        tied_rows = weight[self.shared] + self.identity.to(weight.device, weight.dtype)[tied_ids.to(weight.device)]
        head = torch.cat([weight.index_select(0, self.kept.to(weight.device)), tied_rows])
        column = torch.where(is_tied, len(self.kept) + torch.searchsorted(present, safe).clamp_max(
            max(len(present) - 1, 0)), self.column.to(device)[safe])
        columns = torch.where(valid, column, IGNORE_INDEX)
        # each sample stands for n / CLASS_SAMPLES tied tokens; one of the targets' own rows counts there already
        offset = torch.where(torch.isin(sampled, present), -math.inf, self.log_n - math.log(CLASS_SAMPLES))
        return head, columns, offset.to(weight.device), CLASS_SAMPLES


def narrow_head_loss(hidden_states, weight, labels, tied: TiedTokens, num_items_in_batch=None,
                     ignore_index: int = IGNORE_INDEX, shift_labels=None, chunk_size: int | None = None):
    """transformers' ForCausalLMLoss(hidden_states @ weight.T, labels) for a weight whose tied rows are equal (or
    the shared row plus each one's identity vector).

    `chunk_size` (--chunked_loss_size): the narrow head's loss and gradients `chunk_size` tokens at a time."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    valid = targets != ignore_index
    head, columns, tail_offset, tail = tied.head(weight, torch.where(valid, targets, IGNORE_INDEX))
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if chunk_size:
        total = ChunkedLinearCrossEntropy.apply(hidden, head, columns, chunk_size, head.shape[0], tail_offset, tail)
    else:
        logits = (hidden @ head.T).float()
        logits[:, head.shape[0] - tail:] += tail_offset  # the log-sum-exp of the tokens each column stands for
        total = F.cross_entropy(logits, columns, ignore_index=IGNORE_INDEX, reduction="sum")
    if tied.identity is None:
        total = total + tied.log_n * (columns == len(tied.kept)).sum()  # a tied target: its 1/n share of the class
    if num_items_in_batch is None:
        return total / valid.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _narrow_head_loss(model, hidden_states, labels, **loss_kwargs):
    return narrow_head_loss(hidden_states, model.lm_head.weight, labels, model._tied_tokens,
                            chunk_size=getattr(model, "_chunked_loss_size", None), **loss_kwargs)


def _tied_batch(model, input_ids, labels):
    """What the training forward reads: each tied id reads the shared row (its gradient goes there), plus its
    identity vector; --tied_rename_prob renames first, --tied_input_dropout then replaces inputs only."""
    tied = model._tied_tokens
    if tied.rename_prob:
        input_ids, labels = tied.rename(input_ids, labels)
    ids = input_ids
    if tied.input_dropout:  # a random tied token: the targets stay
        dropped = torch.rand(ids.shape, device=ids.device) < tied.input_dropout
        ids = torch.where(dropped, tied.tied.to(ids.device)[torch.randint_like(ids, len(tied.tied))], ids)
    rows = tied.row.to(ids.device)[ids]
    if tied.identity is None:
        return rows, None, labels  # the same vectors: tied rows are equal
    embedding = model.get_input_embeddings()
    return None, embedding(rows) + tied.identity.to(embedding.weight)[ids], labels


class TieTokensCallback(TrainerCallback):
    """Sets the tied rows back to the shared row after each optimizer step (weight decay moved them)."""

    def __init__(self, tied: TiedTokens):
        self.tied = tied

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.tied.tie(model.get_input_embeddings().weight)


def tie_tokens(model, train_set, below: int, input_dropout: float = 0.0, identity_std: float = 0.0,
               rename_prob: float = 0.0) -> tuple[list[TrainerCallback], dict | None]:
    """Tie the rows of the tokens `train_set` holds fewer than `below` times; train on the narrow head.

    `input_dropout` (--tied_input_dropout): the probability that a training input token reads the shared row.
    `identity_std`, `rename_prob` (--tied_identity_std, --tied_rename_prob): see TiedTokens and TiedTokens.rename.

    Returns the callbacks that keep them tied and the summary results.json records (below, kept, tied), or
    ([], None) when no two tokens are that rare."""
    if not isinstance(model, GPT2LMHeadModel) or model.lm_head.weight is not model.transformer.wte.weight:
        raise UsageError(f"{FLAG} needs a GPT-2 model with tied input and output embeddings; drop {FLAG}")
    vocab_size = model.lm_head.out_features
    counts = training_token_counts(train_set, vocab_size)
    if (counts < below).sum() < 2:
        logger.info("%s %d: no two tokens are that rare in the training data; nothing to tie", FLAG, below)
        return [], None
    tied = TiedTokens(counts, below, input_dropout, identity_std, model.config.n_embd, rename_prob)
    tied.tie(model.lm_head.weight)
    model._tied_tokens = tied
    replace_training_loss(model, _narrow_head_loss, batch_map=_tied_batch)
    logger.info("%s %d: %d tokens keep their own row, %d share one (%d of them occur in the training data); the "
                "training LM head is %.1fx narrower", FLAG, below, len(tied.kept), len(tied.tied),
                int((counts[tied.tied.numpy()] > 0).sum()), vocab_size / (len(tied.kept) + 1))
    summary = {"below": tied.below, "kept": len(tied.kept), "tied": len(tied.tied)}
    for key, value in (("input_dropout", input_dropout), ("identity_std", identity_std),
                       ("rename_prob", rename_prob)):
        if value:
            summary[key] = value
    return [TieTokensCallback(tied)], summary
