"""--rare_tokens_below (wikigpt/objectives/rare_tokens.py): the narrow head's loss and gradients are
those of a GPT-2 whose tied rows are one shared parameter, the saved model's full softmax gives the
training loss's probabilities, and train.py saves a plain GPT-2 whose tied rows are equal.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import WT2
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from wikigpt.errors import UsageError
from wikigpt.objectives.chunked_loss import use_chunked_loss
from wikigpt.objectives.rare_tokens import (
    TiedTokens,
    dropout_mask,
    narrow_head_loss,
    share_rare_rows,
    spelling_groups,
)

VOCAB = 40
# the training stream: ids 3..9 twice or more, 10 and 11 once, the rest never
STREAM = np.array([3, 4, 5, 6, 7, 8, 9] * 3 + [10, 11])
GROUPS = (
    np.arange(VOCAB) % 3
)  # --rare_token_groups: three groups, whose tied tokens share rows 0, 1 and 2


class Stream(
    torch.utils.data.Dataset
):  # as wikigpt.data.block_offsets.RandomOffsetBlocks: the token stream in `ids`
    def __init__(self, ids):
        self.ids = ids


def tiny_model(seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
            n_layer=1,
            n_head=2,
            n_embd=16,
            n_positions=16,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def batch(seed=1) -> torch.Tensor:
    """Inputs and targets from the stream, with a token the stream never holds (25) and an ignored
    label."""
    rng = torch.Generator().manual_seed(seed)
    ids = torch.as_tensor(STREAM)[torch.randint(0, len(STREAM), (3, 12), generator=rng)]
    ids[0, 5], ids[2, 0] = 25, 39
    return ids


def shared_parameter_loss(model, tied: TiedTokens, inputs, labels):
    """The reference: a plain GPT-2 forward whose embedding is W[row], so each tied id reads the
    shared row."""
    weight = model.transformer.wte.weight[tied.row]
    hidden = model.transformer(inputs_embeds=F.embedding(inputs, weight)).last_hidden_state
    logits = (hidden[:, :-1] @ weight.T).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("below, groups", [(1, None), (2, None), (2, GROUPS)])
@pytest.mark.parametrize(
    "chunk_size", [None, 7]
)  # --chunked_loss_size: 36 targets in chunks of 7, the last of 1
def test_loss_and_gradients_are_those_of_one_shared_row(below, groups, chunk_size):
    narrow, reference = tiny_model(), tiny_model()
    if chunk_size:
        use_chunked_loss(narrow, chunk_size)
    (callback,), summary = share_rare_rows(narrow, Stream(STREAM), below, groups=groups)
    expected = {"below": below, "kept": len(callback.tied.kept), "tied": len(callback.tied.tied)}
    assert summary == (expected if groups is None else {**expected, "groups": [11, 11, 11]})
    reference.load_state_dict(narrow.state_dict())
    inputs = batch()
    labels = inputs.clone()
    labels[1, 2] = -100
    narrow.train(), reference.train()
    narrow_loss = narrow(input_ids=inputs, labels=labels).loss
    reference_loss = shared_parameter_loss(reference, callback.tied, inputs, labels)
    assert narrow_loss.item() == pytest.approx(reference_loss.item(), rel=1e-6)
    narrow_loss.backward(), reference_loss.backward()
    for (name, p_narrow), p_reference in zip(narrow.named_parameters(), reference.parameters()):
        assert torch.allclose(p_narrow.grad, p_reference.grad, rtol=1e-4, atol=1e-6), name
    shared = callback.tied.shared
    assert shared.tolist() == ([0] if groups is None else [0, 1, 2])
    assert (narrow.transformer.wte.weight.grad[shared].abs().sum(1) > 0).all()


@pytest.mark.parametrize("below, groups", [(1, None), (2, None), (2, GROUPS)])
def test_the_saved_models_full_softmax_is_the_training_loss(below, groups):
    model = tiny_model()
    share_rare_rows(model, Stream(STREAM), below, groups=groups)
    inputs = batch()
    model.eval()
    full = model(
        input_ids=inputs, labels=inputs
    ).loss.item()  # eval: GPT2LMHeadModel's own full-head forward
    model.train()
    assert model(input_ids=inputs, labels=inputs).loss.item() == pytest.approx(full, rel=1e-6)


def test_a_step_keeps_the_tied_rows_equal():
    model = tiny_model()
    (callback,), _ = share_rare_rows(model, Stream(STREAM), 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    model(input_ids=batch(), labels=batch()).loss.backward()
    optimizer.step()
    wte = model.transformer.wte.weight
    assert not torch.equal(
        wte[1], wte[0]
    )  # weight decay moved the other tied rows, the gradient the shared one
    callback.on_optimizer_step(None, None, None, model=model)
    assert torch.equal(wte[[1, 2, 10, 11, 39]], wte[[0]].expand(5, -1))
    assert not torch.equal(wte[3], wte[0])


def test_which_tokens_are_tied():
    counts = np.array([0, 3, 1, 0, 2])
    tied = TiedTokens(counts, 2)
    assert (
        tied.kept.tolist() == [1, 4]
        and tied.tied.tolist() == [0, 2, 3]
        and tied.shared.tolist() == [0]
    )
    assert tied.column.tolist() == [2, 0, 2, 2, 1] and tied.row.tolist() == [0, 1, 0, 0, 4]
    loss = narrow_head_loss(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.tensor([[1, 3]]), tied)
    assert loss.item() == pytest.approx(np.log(5))  # all logits 0: uniform over the full vocabulary


def test_which_tokens_are_tied_in_groups():
    counts = np.array([0, 3, 1, 0, 2, 0])
    tied = TiedTokens(counts, 2, groups=np.array([7, 7, 5, 7, 9, 8]))  # group 9 holds no tied token
    assert tied.kept.tolist() == [1, 4] and tied.tied.tolist() == [0, 2, 3, 5]
    assert tied.shared.tolist() == [2, 0, 5] and tied.log_n.tolist() == pytest.approx(
        [0, np.log(2), 0]
    )
    assert tied.column.tolist() == [3, 0, 2, 3, 1, 4] and tied.row.tolist() == [0, 1, 2, 0, 4, 5]
    assert tied.unknown_row.tolist() == [0, 0, 2, 0, 0, 5]  # group 9: the largest group's row
    labels = torch.tensor([[1, 3, 2, 4]])
    loss = narrow_head_loss(torch.zeros(1, 4, 4), torch.zeros(6, 4), labels, tied)
    assert loss.item() == pytest.approx(np.log(6))  # all logits 0: uniform over the full vocabulary


def test_spelling_groups_of_the_gpt2_tokenizer(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(
        ["The", "the", ".", "ĠThe", "Ġthe", "Ġ1", "Ċ", "<|endoftext|>"]
    )
    assert spelling_groups(tokenizer, 50257)[ids].tolist() == [0, 1, 2, 3, 4, 5, 5, 2]


def test_nothing_rare_leaves_the_model_alone():
    model = tiny_model()
    forward = model.forward
    assert (
        share_rare_rows(model, Stream(np.arange(VOCAB)), 1) == ([], None)
        and model.forward == forward
    )


def test_train_py_saves_a_plain_gpt2_with_equal_tied_rows(micro_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = micro_args(
        micro_files,
        out,
        "--rare_tokens_below",
        2,
        "--random_block_offset",
        max_steps=4,
        save_steps=4,
    )
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    tied = results["model"]["rare_tokens"]
    assert (
        tied["below"] == 2 and tied["kept"] + tied["tied"] == 50257 and 500 < tied["kept"] < 5_000
    )
    rows = {
        tuple(row.tolist())
        for row in load_file(out / "model.safetensors")["transformer.wte.weight"]
    }
    assert len(rows) == tied["kept"] + 1  # the kept rows, and one shared by the tied tokens


def test_train_py_ties_by_spelling(micro_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = micro_args(
        micro_files,
        out,
        "--rare_tokens_below",
        2,
        "--rare_token_groups",
        "spelling",
        max_steps=2,
        save_steps=2,
    )
    assert train_in_process(argv, monkeypatch) == 0
    tied = json.loads((out / "results.json").read_text())["model"]["rare_tokens"]
    assert len(tied["groups"]) == 6 and sum(tied["groups"]) == tied["tied"]
    rows = {
        tuple(row.tolist())
        for row in load_file(out / "model.safetensors")["transformer.wte.weight"]
    }
    assert len(rows) == tied["kept"] + 6  # the kept rows, and one per spelling group


@pytest.mark.parametrize(
    "groups", [None, GROUPS]
)  # GROUPS: a dropped input reads its own group's row
def test_input_dropout_replaces_inputs_with_the_shared_row_and_keeps_the_targets(groups):
    model, reference = tiny_model(), tiny_model()
    (callback,), summary = share_rare_rows(
        model, Stream(STREAM), 2, input_dropout=0.5, groups=groups
    )
    assert summary["input_dropout"] == 0.5
    reference.load_state_dict(model.state_dict())
    inputs = batch()
    model.train(), reference.train()
    callback.tied.seed, callback.tied.step = 3, 5  # as the Trainer's callbacks set them
    loss = model(input_ids=inputs, labels=inputs).loss
    dropped = dropout_mask(inputs, 0.5, seed=3, step=5)
    assert 0 < dropped.sum() < dropped.numel()
    unknown = (
        callback.tied.shared[0] if groups is None else torch.as_tensor(groups)[inputs]
    )  # rows 0, 1, 2
    read = torch.where(
        dropped, unknown, inputs
    )  # what the transformer reads; the targets: `inputs`
    weight = reference.transformer.wte.weight[callback.tied.row]
    hidden = reference.transformer(inputs_embeds=F.embedding(read, weight)).last_hidden_state
    expected = F.cross_entropy(
        (hidden[:, :-1] @ weight.T).reshape(-1, VOCAB), inputs[:, 1:].reshape(-1)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    model.eval(), reference.eval()  # evaluation reads every token
    assert model(input_ids=inputs, labels=inputs).loss.item() == pytest.approx(
        reference(input_ids=inputs, labels=inputs).loss.item(), rel=1e-6
    )


def test_a_blocks_dropout_mask_depends_on_its_tokens_seed_and_step_only():
    """2 processes of 2 blocks draw what 1 process of 4 draws; a resumed run redraws its step's."""
    blocks = torch.randint(0, 50_000, (4, 256), generator=torch.Generator().manual_seed(0))
    whole = dropout_mask(blocks, 0.1, seed=42, step=7)
    halves = [dropout_mask(blocks[i : i + 2], 0.1, seed=42, step=7) for i in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=0)
    torch.testing.assert_close(dropout_mask(blocks.flip(0), 0.1, 42, 7), whole.flip(0))
    torch.manual_seed(1)  # no other generator takes part
    torch.testing.assert_close(dropout_mask(blocks, 0.1, 42, 7), whole, rtol=0, atol=0)
    assert whole.float().mean().item() == pytest.approx(0.1, abs=0.02)
    for other in (dropout_mask(blocks, 0.1, 42, 8), dropout_mask(blocks, 0.1, 43, 7)):
        assert 0.1 < (other != whole).float().mean().item() < 0.3  # independent draws: 0.18
    shifted = blocks.clone()
    shifted[:, 0] += 1  # another block: another mask
    assert (dropout_mask(shifted, 0.1, 42, 7) != whole).any(dim=1).all()


def small_tokenizer(kind: str):
    """A WordPiece, SentencePiece-style (Unigram with Metaspace) or word-level tokenizer trained on
    WikiText lines."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (WT2 / "wiki.valid.raw").read_text(encoding="utf-8").splitlines()[:400]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[UNK]"])
    elif kind == "sentencepiece":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=600, special_tokens=["<unk>"], unk_token="<unk>"
        )
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(vocab_size=600, special_tokens=["[UNK]"])
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, name_or_path=kind)


@pytest.mark.parametrize(
    "kind, expected",
    [
        (
            "wordpiece",
            {"The": 3, "the": 4, "##s": 1, ",": 5},
        ),  # words start unmarked; '##' continues one
        ("sentencepiece", {"▁The": 3, "▁the": 4, "s": 1, ",": 2}),  # '▁' starts a word
    ],
)
def test_spelling_groups_read_other_tokenizers_word_starts(kind, expected):
    tokenizer = small_tokenizer(kind)
    groups = spelling_groups(tokenizer, len(tokenizer))
    vocab = tokenizer.get_vocab()
    assert {token: int(groups[vocab[token]]) for token in expected} == expected
    assert len(set(groups.tolist())) == 6  # the six groups do not collapse


def test_spelling_groups_refuse_a_tokenizer_without_word_starts():
    with pytest.raises(UsageError) as err:
        spelling_groups(small_tokenizer("wordlevel"), 600)
    assert str(err.value) == (
        "--rare_token_groups spelling reads word starts from 'Ġ' (byte-level BPE), '▁' "
        "(SentencePiece) or '##' (WordPiece) tokens, and tokenizer 'wordlevel' marks none; "
        "pass --rare_token_groups one"
    )


@pytest.mark.parametrize(
    "kind, name",
    [("wordpiece", "WordPiece"), ("sentencepiece", "Unigram"), ("wordlevel", "WordLevel")],
)
def test_rank_slopes_refuse_a_vocabulary_not_in_merge_order(kind, name, tokenizer):
    from wikigpt.calibration.token_offsets import check_rank_order

    check_rank_order(tokenizer)  # GPT-2's byte-level BPE: ids in merge order
    with pytest.raises(UsageError) as err:
        check_rank_order(small_tokenizer(kind))
    assert str(err.value) == (
        f"--calibrate_token_offsets fits a slope on log(1 + token id), which follows a BPE "
        f"vocabulary's merge order; tokenizer {kind!r} is {name}: use a BPE tokenizer or "
        f"drop --calibrate_token_offsets"
    )
