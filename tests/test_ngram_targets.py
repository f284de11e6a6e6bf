"""--distill_ngram_share (wikigpt/ngram_targets.py, wikigpt/distillation.py): the n-gram's distributions are Kneser-Ney's,
each position's from an n-gram that never saw it; the student's loss and gradients are the cross-entropy against
(1 - share - g) x one-hot + share x the teacher's softmax + g x the n-gram's, at each block's stream position.
"""

import json

import numpy as np
import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from test_distillation import SHARE, teacher_of
from test_tied_tokens import VOCAB, tiny_model

from wikigpt.block_offsets import RandomOffsetBlocks
from wikigpt.chunked_loss import use_chunked_loss
from wikigpt.distillation import attach_ngram
from wikigpt.kneser_ney import KneserNey
from wikigpt.ngram_targets import NgramTargets, next_token_distributions

RNG = np.random.default_rng(0)
STREAM = RNG.integers(3, 12, 300)


def test_distributions_are_the_kneser_ney_models():
    model = KneserNey(STREAM[:200], 3, 16)
    positions = np.arange(len(STREAM))
    dense = next_token_distributions(model, model.gram_ids(STREAM), positions)
    for j in (0, 1, 2, 57, 299):
        assert np.allclose(dense[j].numpy(), model.distribution(STREAM[:j]), atol=1e-6), j


def test_each_position_is_predicted_by_an_ngram_that_never_saw_it():
    stream = STREAM.copy()
    stream[10:150:10], stream[11:150:10] = 12, 13  # "12 13" only in the first half (fold 0 of 2)
    targets = NgramTargets(stream, 16, 0.3, order=2, folds=2, top_k=16)
    seen_there = targets.dense(torch.arange(11, 150, 10))[:, 13]  # the positions of 13, after 12
    assert (seen_there < 0.01).all()  # fold 1's bigram never saw 12 or 13
    everywhere = KneserNey(stream, 2, 16).distribution([12])[13]
    assert everywhere > 0.5  # what an n-gram of the whole stream would have taught there


@pytest.mark.parametrize("top_k", [3, 16])
def test_top_k_and_the_unigram_rest_sum_to_one(top_k):
    targets = NgramTargets(STREAM, 16, 0.3, order=3, folds=3, top_k=top_k)
    dense = targets.dense(torch.arange(len(STREAM)))
    assert torch.allclose(dense.sum(1), torch.ones(len(STREAM)), atol=1e-5)
    if top_k == 16:  # all columns kept: exactly the fold's model (the first fold's n-gram fitted on folds 1 and 2)
        model = KneserNey(STREAM[100:], 3, 16)
        assert np.allclose(dense[57].numpy(), model.distribution(STREAM[:57]), atol=1e-6)


@pytest.mark.parametrize("with_teacher", [True, False])  # False: --distill_ngram_share without --distill_from
def test_student_loss_mixes_teacher_ngram_and_data(with_teacher):
    g = 0.4
    stream = np.random.default_rng(1).integers(0, VOCAB, 200)
    blocks = RandomOffsetBlocks(stream, 12, seed=3)
    blocks.with_block_start, _ = True, blocks.set_epoch(2)
    batch = torch.utils.data.default_collate([blocks[i] for i in (0, 4, 9)])
    student, reference, teacher = tiny_model(), tiny_model(), teacher_of()
    reference.load_state_dict(student.state_dict())
    use_chunked_loss(student, 7)
    share = SHARE if with_teacher else 0.0
    if with_teacher:
        object.__setattr__(student, "_teacher", teacher)
    attach_ngram(student, blocks, g)
    student.train()
    loss = student(**batch).loss

    inputs, starts = batch["input_ids"], batch["block_start"]
    log_probs = reference(input_ids=inputs).logits[:, :-1].reshape(-1, VOCAB).float().log_softmax(-1)
    with torch.no_grad():
        teacher_probs = teacher.model(input_ids=inputs).logits[:, :-1].reshape(-1, VOCAB).float().softmax(-1)
    positions = (starts[:, None] + torch.arange(1, 12)).reshape(-1)  # each target's place in the stream
    assert torch.equal(torch.as_tensor(stream)[positions], inputs[:, 1:].reshape(-1))
    soft = share * teacher_probs + g * student._teacher.ngram.dense(positions)
    targets = inputs[:, 1:].reshape(-1)
    expected = ((1 - share - g) * -log_probs.gather(1, targets[:, None]).squeeze(1) - (soft * log_probs).sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward(), expected.backward()
    for (name, p_student), p_reference in zip(student.named_parameters(), reference.parameters()):
        assert torch.allclose(p_student.grad, p_reference.grad, rtol=1e-4, atol=1e-6), name


def test_ngram_alone_trains_without_a_teacher(micro_files, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = micro_args(micro_files, out, "--tie_tokens_below", 2, "--distill_ngram_share", 0.25,
                      "--random_block_offset", max_steps=2, save_steps=2)
    assert train_in_process(argv, monkeypatch) == 0
    model = json.loads((out / "results.json").read_text())["model"]
    assert model["ngram_targets"]["share"] == 0.25 and "distilled_from" not in model


def test_train_py_records_the_ngram_share(micro_files, tmp_path, monkeypatch):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    assert train_in_process(micro_args(micro_files, teacher_dir, "--tie_tokens_below", 2, max_steps=2,
                                       save_steps=2), monkeypatch) == 0
    argv = micro_args(micro_files, out, "--tie_tokens_below", 2, "--distill_from", teacher_dir / "checkpoint-2",
                      "--distill_ngram_share", 0.3, "--random_block_offset", max_steps=3, save_steps=3)
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["ngram_targets"] == {"share": 0.3, "order": 4, "folds": 5}
    assert results["model"]["distilled_from"]["share"] == 0.5
    assert np.isfinite(results["train"]["train_loss"])


@pytest.mark.parametrize("extra, message", [
    (["--distill_ngram_share", 1, "--random_block_offset"],
     "error: --distill_ngram_share is the n-gram's part of each training target, in [0, 1); got 1.0. "
     "Pass e.g. --distill_ngram_share 0.15, or 0 for none"),
    (["--distill_from", "T", "--distill_share", 0.8, "--distill_ngram_share", 0.3, "--random_block_offset"],
     "error: --distill_share 0.8 and --distill_ngram_share 0.3 are parts of each training target and add up to "
     "more than 1; lower one of them"),
    (["--distill_ngram_share", 0.3],
     "error: --distill_ngram_share reads each block's place in the training stream: pass --random_block_offset"),
])
def test_bad_ngram_arguments_exit_2_with_one_line(micro_files, tmp_path, monkeypatch, capsys, extra, message):
    out = tmp_path / "run"
    assert train_in_process(micro_args(micro_files, out, *extra, max_steps=2), monkeypatch) == 2
    assert capsys.readouterr().err.splitlines()[-1] == message
    assert not out.exists() or not (out / "model.safetensors").exists()
