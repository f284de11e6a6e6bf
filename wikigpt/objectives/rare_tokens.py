"""--rare_tokens_below K: tokens the training data holds fewer than K times share one embedding row.

A small model on a small corpus spends most of its compute in the LM head: at 8 x 128 on WikiText-2
the 50,257-wide head is ~75% of a training step's FLOPs, while the training split holds only ~17,400
distinct tokens.

K = 1 ties the tokens the training data never contains. In full-softmax training their rows only
ever get the same push down (sum over positions of p(u) * h) and nothing else, so tying them changes
what the model can learn in nothing that the data could teach it, and the training loss no longer
needs their logits one by one: it computes logits for the kept tokens plus one column for the shared
row, h . e_shared + log(n_tied), which is the log-sum-exp of the n equal tied logits. That is 2.9x
narrower on WikiText-2, and 1.5x faster CPU steps.

K = 2 or more also ties the rare tokens (seen once, ...): they become one class whose probability
the model learns from their occurrences, spread evenly over its members. That is how word-level LMs
learn <unk>, and it is what a model needs to give a sensible probability to tokens it has never
seen: every token that first shows up in held-out or test text is a member of the class. Without it
(K = 1), no training target ever belongs to the shared row, so training pushes its probability down
for ever, and every unseen test token costs more each epoch.

The shared row is one parameter: the training forward maps tied input ids to it and the loss reaches
it through the shared column, so its gradient is the sum of every use. After each optimizer step the
other tied rows are set to it again (weight decay alone moved them), so the saved, evaluated or
sampled model is a plain GPT2LMHeadModel whose full 50,257-way softmax gives exactly the
probabilities the training loss used: a tied token gets p(shared class) / n_tied. From scratch only:
a pretrained checkpoint's rows carry what it learned.
With --chunked_loss_size the narrow head's loss and gradients are computed in chunks
(wikigpt.objectives.chunked_loss).
With --rare_input_dropout P each training input token reads the shared row with probability P (the
targets stay): new text holds more unknown tokens than the training text, and the model learns to
read such contexts. A block's mask is drawn from (--seed, the optimizer step, the block's tokens)
(dropout_mask), so 2 processes draw what 1 process draws, and a resumed run what the uninterrupted
one drew.
With --rare_token_groups spelling the tied tokens share six rows, one per group of spelling
(spelling_groups), each a column of the narrow head: the model then learns which kind of unknown
token comes next, not only that one does.
"""

import hashlib
import logging

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel, TrainerCallback

from wikigpt.objectives.chunked_loss import ChunkedLinearCrossEntropy
from wikigpt.errors import UsageError
from wikigpt.objectives.training_loss import replace_training_loss

logger = logging.getLogger(__name__)

FLAG = "--rare_tokens_below"
DROPOUT_FLAG = "--rare_input_dropout"
GROUPS_FLAG = "--rare_token_groups"
IGNORE_INDEX = -100


def check_rare_tokens_args(args, model_name_or_path: str | None = None) -> None:
    """`args`: wikigpt.objectives.arguments.LeverArguments; `model_name_or_path`: the run's
    checkpoint, if any."""
    below, dropout = args.rare_tokens_below, args.rare_input_dropout
    if not 0 <= dropout < 1:
        raise UsageError(
            f"{DROPOUT_FLAG} is the probability that a training input token reads the shared row, "
            f"0 or more and below 1 (e.g. 0.05); got {dropout}"
        )
    if below is None:
        if dropout:
            raise UsageError(
                f"{DROPOUT_FLAG} replaces training input tokens with the row {FLAG} shares: add "
                f"{FLAG} K (e.g. 3), or drop {DROPOUT_FLAG}"
            )
        if args.rare_token_groups != "one":
            raise UsageError(
                f"{GROUPS_FLAG} {args.rare_token_groups} groups the tokens {FLAG} ties: add {FLAG} "
                f"K (e.g. 3), or drop {GROUPS_FLAG}"
            )
        return
    if below < 1:
        raise UsageError(
            f"{FLAG} is a count of occurrences in the training data, 1 or more (1: only the tokens "
            f"it never contains; 2: also those it holds once); got {below}"
        )
    if model_name_or_path:
        raise UsageError(
            f"{FLAG} only applies to a model built from scratch (a checkpoint's embedding rows "
            f"hold what it learned); drop {FLAG}, or drop --model_name_or_path"
        )


def training_token_counts(train_set, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the training data (re-cut blocks' stream, or the fixed
    blocks)."""
    ids = getattr(
        train_set, "ids", None
    )  # wikigpt.data.block_offsets.RandomOffsetBlocks keeps the whole stream
    if ids is None:
        ids = pc.list_flatten(train_set.with_format("arrow")[:]["input_ids"]).to_numpy()
    return np.bincount(ids, minlength=vocab_size)


# Where a token says it starts a new word: GPT-2's byte-level BPE and SentencePiece mark a leading
# space, WordPiece marks a word's continuation. A tokenizer with none of these gives the spelling
# groups nothing to read.
WORD_MARKERS = {"Ġ": "byte-level BPE", "▁": "SentencePiece", "##": "WordPiece"}
MARKED_SHARE = (
    0.05  # a convention is the tokenizer's when at least this share of its vocabulary carries it
)


def word_marker(tokenizer) -> str:
    """The tokenizer's word-boundary marker (a key of WORD_MARKERS), read from its vocabulary;
    UsageError if none."""
    vocab = tokenizer.get_vocab()
    shares = {
        marker: sum(token.startswith(marker) for token in vocab) / max(1, len(vocab))
        for marker in WORD_MARKERS
    }
    marker = max(shares, key=shares.get)
    if shares[marker] < MARKED_SHARE:
        raise UsageError(
            f"{GROUPS_FLAG} spelling reads word starts from 'Ġ' (byte-level BPE), '▁' "
            f"(SentencePiece) or '##' (WordPiece) tokens, and tokenizer "
            f"{tokenizer.name_or_path!r} marks none; pass {GROUPS_FLAG} one"
        )
    return marker


def spelling_groups(tokenizer, vocab_size: int) -> np.ndarray:
    """--rare_token_groups spelling: each token id's group, 3 x (starts a new word) + (upper-case
    first letter: 0, lower-case: 1, anything else: 2), from the token's own text. A new name, a
    word's next piece and a number are different kinds of unknown token, and the context tells which
    one comes next. A new word is a leading space for byte-level BPE (GPT-2) and SentencePiece, and
    any token but a '##' continuation for WordPiece."""
    marker = word_marker(tokenizer)
    groups = np.full(vocab_size, 2, dtype=np.int64)
    for token_id, token in enumerate(
        tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    ):
        if token is None:
            continue
        if (
            marker == "Ġ"
        ):  # byte-level: the token's bytes as text (a leading space, accented letters)
            text = tokenizer.convert_tokens_to_string([token])
            new_word, first = text[:1].isspace(), text[1:2] if text[:1].isspace() else text[:1]
        elif marker == "▁":
            new_word = token.startswith(marker)
            first = token[len(marker) : len(marker) + 1] if new_word else token[:1]
        else:  # WordPiece: words start unmarked, continuations carry '##'
            new_word = not token.startswith(marker)
            first = token[:1] if new_word else token[len(marker) : len(marker) + 1]
        groups[token_id] = 3 * new_word + (0 if first.isupper() else 1 if first.islower() else 2)
    return groups


class TiedTokens:
    """Kept and tied ids, each id's column in the narrow head, and each id's row in the training
    forward.

    `groups` (--rare_token_groups): a group id per token; the tied tokens of each group share that
    group's row (its first tied token's) and one column of the narrow head. None: all tied tokens
    share one."""

    def __init__(
        self,
        counts: np.ndarray,
        below: int,
        input_dropout: float = 0.0,
        groups: np.ndarray | None = None,
    ):
        groups = np.zeros(len(counts), dtype=np.int64) if groups is None else np.asarray(groups)
        tied = np.flatnonzero(counts < below)
        self.below, self.input_dropout = below, input_dropout
        self.seed, self.step = 0, 0  # dropout_mask's key: --seed and the optimizer step
        self.kept = torch.as_tensor(np.flatnonzero(counts >= below), dtype=torch.long)
        self.tied = torch.as_tensor(tied, dtype=torch.long)
        names, index, sizes = np.unique(groups[tied], return_index=True, return_counts=True)
        self.shared = torch.as_tensor(
            tied[index], dtype=torch.long
        )  # each group's row, in group order
        self.log_n = torch.as_tensor(
            np.log(sizes), dtype=torch.float32
        )  # each group's class: n equal logits
        self.class_of = torch.as_tensor(
            np.searchsorted(names, groups[tied]), dtype=torch.long
        )  # per tied token
        self.column = torch.full((len(counts),), len(self.kept), dtype=torch.long)
        self.column[self.kept] = torch.arange(len(self.kept))
        self.column[self.tied] += self.class_of
        self.row = torch.arange(len(counts))
        self.row[self.tied] = self.shared[self.class_of]
        # --rare_input_dropout: a dropped input reads its own group's row (the largest group's if
        # none of its group is tied), as an unknown token of that spelling would
        position = np.searchsorted(names, groups).clip(max=len(names) - 1)
        own = names[position] == groups
        self.unknown_row = torch.as_tensor(
            np.where(own, tied[index][position], tied[index][sizes.argmax()])
        )

    @property
    def columns(self) -> int:
        return len(self.kept) + len(self.shared)

    @torch.no_grad()
    def tie(self, weight: torch.Tensor) -> None:
        weight[self.tied.to(weight.device)] = weight[self.row[self.tied].to(weight.device)].clone()


def narrow_head_loss(
    hidden_states,
    weight,
    labels,
    tied: TiedTokens,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels=None,
    chunk_size: int | None = None,
    teacher=None,
):
    """transformers' ForCausalLMLoss(hidden_states @ weight.T, labels) for a weight whose tied rows
    are equal.

    `chunk_size` (--chunked_loss_size): the narrow head's loss and gradients `chunk_size` tokens at
    a time.
    `teacher` (--distill_from): its distribution over the narrow head's classes is mixed into the
    targets (the tied class as one: the student spreads it evenly over the tied tokens whatever the
    target)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    valid = targets != ignore_index
    columns = torch.where(valid, tied.column.to(targets.device)[targets.clamp_min(0)], IGNORE_INDEX)
    head = weight.index_select(0, torch.cat([tied.kept, tied.shared]).to(weight.device))
    log_n = tied.log_n.to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    if teacher is not None:
        total = ChunkedLinearCrossEntropy.apply(
            hidden,
            head,
            columns,
            chunk_size or hidden.shape[0],
            head.shape[0],
            log_n,
            teacher.class_logits(tied),
            teacher.share,
        )
    elif chunk_size:
        total = ChunkedLinearCrossEntropy.apply(
            hidden, head, columns, chunk_size, head.shape[0], log_n
        )
    else:
        logits = (hidden @ head.T).float()
        logits[:, len(tied.kept) :] += (
            log_n  # log-sum-exp of a group's n equal tied logits: its class's log-prob
        )
        total = F.cross_entropy(logits, columns, ignore_index=IGNORE_INDEX, reduction="sum")
    one_hot = 1 - teacher.share if teacher is not None else 1
    tied_targets = (columns[valid] - len(tied.kept)).clamp_min(-1)  # -1: a kept target
    in_class = torch.bincount(tied_targets + 1, minlength=len(log_n) + 1)[1:]
    total = total + one_hot * (in_class * log_n).sum()  # a tied target: 1/n of its class
    if num_items_in_batch is None:
        return total / valid.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _narrow_head_loss(model, hidden_states, labels, teacher=None, **loss_kwargs):
    return narrow_head_loss(
        hidden_states,
        model.lm_head.weight,
        labels,
        model._tied_tokens,
        chunk_size=getattr(model, "_chunked_loss_size", None),
        teacher=teacher,
        **loss_kwargs,
    )


def dropout_mask(ids: torch.Tensor, p: float, seed: int, step: int) -> torch.Tensor:
    """Which input tokens --rare_input_dropout replaces: each block (row of `ids`) draws its mask
    from a generator keyed by (seed, step, its tokens), so the mask depends on neither the process
    nor the batch position the block lands in, nor on any other random number drawn before."""
    rows = ids.detach().reshape(-1, ids.shape[-1]).cpu().numpy().astype(np.int64)
    key = np.array([seed, step], dtype=np.int64).tobytes()
    masks = []
    for row in rows:
        digest = hashlib.blake2b(key + row.tobytes(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        masks.append(torch.rand(row.shape, generator=generator) < p)
    return torch.stack(masks).reshape(ids.shape).to(ids.device)


def _shared_row_ids(model, input_ids):
    # the same vectors (tied rows are equal); the gradient of every tied input goes to the shared
    # row
    tied = model._tied_tokens
    ids = tied.row.to(input_ids.device)[input_ids]
    if tied.input_dropout:  # --rare_input_dropout: inputs only, the targets stay
        dropped = dropout_mask(input_ids, tied.input_dropout, tied.seed, tied.step)
        ids = torch.where(dropped, tied.unknown_row.to(input_ids.device)[input_ids], ids)
    return ids


class TieTokensCallback(TrainerCallback):
    """Sets the tied rows back to the shared row after each optimizer step (weight decay moved
    them), and gives dropout_mask the run's seed and the step."""

    def __init__(self, tied: TiedTokens):
        self.tied = tied

    def on_train_begin(self, args, state, control, **kwargs):
        self.tied.seed = args.seed

    def on_step_begin(self, args, state, control, **kwargs):
        self.tied.step = state.global_step  # the same in every process, and after a resume

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.tied.tie(model.get_input_embeddings().weight)


def share_rare_rows(
    model, train_set, below: int, input_dropout: float = 0.0, groups: np.ndarray | None = None
) -> tuple[list[TrainerCallback], dict | None]:
    """Tie the rows of the tokens `train_set` holds fewer than `below` times; train on the narrow
    head.

    `input_dropout` (--rare_input_dropout): the probability that a training input token reads the
    shared row.
    `groups` (--rare_token_groups spelling): a group id per token; each group's tied tokens share
    their own row.

    Returns the callbacks that keep them tied and the summary results.json records (below, kept,
    tied), or ([], None) when no two tokens are that rare."""
    if (
        not isinstance(model, GPT2LMHeadModel)
        or model.lm_head.weight is not model.transformer.wte.weight
    ):
        raise UsageError(
            f"{FLAG} needs a GPT-2 model with tied input and output embeddings; drop {FLAG}"
        )
    vocab_size = model.lm_head.out_features
    counts = training_token_counts(train_set, vocab_size)
    if (counts < below).sum() < 2:
        logger.info(
            "%s %d: no two tokens are that rare in the training data; nothing to tie", FLAG, below
        )
        return [], None
    tied = TiedTokens(counts, below, input_dropout, groups)
    tied.tie(model.lm_head.weight)
    model._tied_tokens = tied
    replace_training_loss(model, _narrow_head_loss, input_ids_map=_shared_row_ids)
    logger.info(
        "%s %d: %d tokens keep their own row, %d share %s (%d of them occur in the training data); "
        "the training LM head is %.1fx narrower",
        FLAG,
        below,
        len(tied.kept),
        len(tied.tied),
        "one" if len(tied.shared) == 1 else f"{len(tied.shared)} by spelling",
        int((counts[tied.tied.numpy()] > 0).sum()),
        vocab_size / tied.columns,
    )
    summary = {"below": tied.below, "kept": len(tied.kept), "tied": len(tied.tied)}
    if groups is not None:
        summary["groups"] = torch.bincount(tied.class_of).tolist()  # tied tokens per shared row
    if input_dropout:
        summary["input_dropout"] = input_dropout
    return [TieTokensCallback(tied)], summary
