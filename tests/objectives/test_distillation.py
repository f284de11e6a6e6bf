"""--distill_from (wikigpt/objectives/distillation.py): the loss and gradients are those of the
cross-entropy against (1 - share) x one-hot + share x the teacher's softmax, on the full head and on
--rare_tokens_below's narrow head (the tied tokens as one class); train.py records the teacher and
saves the student alone; bad teachers are refused. So is a teacher whose recorded split
(wikigpt_run.json, or an older run's results.json) differs from the student's: it may have trained
on the student's held-out articles.
"""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from safetensors.torch import load_file
from test_rare_tokens import GROUPS, VOCAB, STREAM, Stream, batch, tiny_model

from wikigpt.objectives.chunked_loss import use_chunked_loss
from wikigpt.objectives.distillation import Teacher, attach_teacher, load_teacher
from wikigpt.model import ModelArguments, load_model
from wikigpt.padded_vocab import pad_vocab
from wikigpt.objectives.rare_tokens import share_rare_rows
from wikigpt.reliability.run_record import split_record

SHARE = 0.3


def teacher_of(seed=5) -> Teacher:
    model = tiny_model(seed)
    with torch.no_grad():  # distinct logits for every token, the tied ones too
        model.lm_head.weight.normal_(0, 1)
    return Teacher(model.eval(), SHARE)


def reference_loss(student, teacher: Teacher, inputs, labels, classes=None):
    """Mean over targets of (1 - a) CE(one-hot) + a CE(teacher), from full-vocabulary logits and
    autograd.

    `classes`: (kept ids, [tied ids of each class]): the soft part over the kept tokens and each
    class as one."""
    logits = student(input_ids=inputs).logits[:, :-1].reshape(-1, VOCAB).float()
    with torch.no_grad():
        teacher_probs = (
            teacher.model(input_ids=inputs).logits[:, :-1].reshape(-1, VOCAB).float().softmax(-1)
        )
    log_probs = logits.log_softmax(-1)
    targets = labels[:, 1:].reshape(-1)
    valid = targets != -100
    one_hot = -log_probs.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    if classes is None:
        soft = -(teacher_probs * log_probs).sum(1)
    else:
        kept, tied = classes
        class_probs = torch.cat(
            [teacher_probs[:, kept], *(teacher_probs[:, ids].sum(1, keepdim=True) for ids in tied)],
            1,
        )
        class_log_probs = torch.cat(
            [log_probs[:, kept], *(log_probs[:, ids].logsumexp(1, keepdim=True) for ids in tied)], 1
        )
        soft = -(class_probs * class_log_probs).sum(1)
    return (((1 - SHARE) * one_hot + SHARE * soft) * valid).sum() / valid.sum()


def attach(model, teacher):
    object.__setattr__(
        model, "_teacher", teacher
    )  # as attach_teacher, without loading a checkpoint


def compare(student, reference, teacher, classes=None):
    inputs = batch()
    labels = inputs.clone()
    labels[1, 2] = -100
    reference.load_state_dict(student.state_dict())
    student.train(), reference.train()
    loss = student(input_ids=inputs, labels=labels).loss
    expected = reference_loss(reference, teacher, inputs, labels, classes)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward(), expected.backward()
    for (name, p_student), p_reference in zip(student.named_parameters(), reference.parameters()):
        assert torch.allclose(p_student.grad, p_reference.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize(
    "pad", [None, 16]
)  # --pad_vocab_multiple: 40 -> 48 columns, the padded ones get nothing
@pytest.mark.parametrize(
    "chunk_size", [None, 7]
)  # None: attach_teacher alone, the whole batch as one chunk
def test_full_head_loss_and_gradients_mix_the_teacher_into_the_targets(pad, chunk_size):
    student, teacher = tiny_model(), teacher_of()
    if pad:
        pad_vocab(student, pad)
    if chunk_size:
        use_chunked_loss(student, chunk_size)  # 33 targets in chunks of 7
        attach(student, teacher)
    else:
        assert attach_teacher(student, teacher.model, "teacher", SHARE) == {
            "teacher": "teacher",
            "share": SHARE,
        }
    compare(student, tiny_model(), teacher)


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize(
    "equal_tied_rows", [False, True]
)  # True: a teacher trained with the same tying
@pytest.mark.parametrize(
    "groups", [None, GROUPS]
)  # --rare_token_groups: each group's tied tokens as one class
def test_narrow_head_takes_the_teachers_tied_tokens_as_one_class(
    chunk_size, equal_tied_rows, groups
):
    student = tiny_model()
    if chunk_size:
        use_chunked_loss(student, chunk_size)
    (callback,), _ = share_rare_rows(student, Stream(STREAM), 2, groups=groups)
    tied = callback.tied
    teacher = teacher_of()
    if equal_tied_rows:
        with torch.no_grad():
            teacher.model.lm_head.weight[tied.tied] = teacher.model.lm_head.weight[
                tied.row[tied.tied]
            ].clone()
    attach(student, teacher)
    assert (tied.row[batch()] != batch()).any()  # the batch holds tied tokens
    classes = [tied.tied[tied.class_of == c] for c in range(len(tied.shared))]
    assert len(classes) == (1 if groups is None else 3)
    # the reference reads the shared row for every tied token, as the narrow head's training forward
    # does
    compare(student, _SharedRows(tiny_model(), tied.row), teacher, (tied.kept, classes))


class _SharedRows(torch.nn.Module):
    """A plain GPT-2 that reads W[row] for its inputs and head: each tied id is the shared row, as
    in training."""

    def __init__(self, model, row):
        super().__init__()
        self.model, self.row = model, row

    def load_state_dict(self, state):
        return self.model.load_state_dict(state)

    def forward(self, input_ids):
        weight = self.model.transformer.wte.weight[self.row]
        hidden = self.model.transformer(
            inputs_embeds=F.embedding(input_ids, weight)
        ).last_hidden_state
        return type("Out", (), {"logits": hidden @ weight.T})


def test_train_py_records_the_teacher_and_saves_the_student_alone(
    micro_files, tmp_path, monkeypatch
):
    teacher_dir, out = tmp_path / "teacher", tmp_path / "student"
    assert (
        train_in_process(
            micro_args(
                micro_files, teacher_dir, "--rare_tokens_below", 2, max_steps=2, save_steps=2
            ),
            monkeypatch,
        )
        == 0
    )
    argv = micro_args(
        micro_files,
        out,
        "--rare_tokens_below",
        2,
        "--distill_from",
        teacher_dir / "checkpoint-2",
        "--distill_share",
        0.25,
        max_steps=2,
        save_steps=2,
    )
    assert train_in_process(argv, monkeypatch) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["distilled_from"] == {
        "teacher": str(teacher_dir / "checkpoint-2"),
        "share": 0.25,
    }
    student, teacher = (
        load_file(out / "model.safetensors"),
        load_file(teacher_dir / "model.safetensors"),
    )
    assert student.keys() == teacher.keys()  # no teacher weights in the student's file
    assert not torch.equal(
        student["transformer.h.0.attn.c_attn.weight"], teacher["transformer.h.0.attn.c_attn.weight"]
    )
    assert np.isfinite(results["train"]["train_loss"])


def test_the_teacher_reads_with_the_students_attention_kernel(tiny_checkpoint, tokenizer):
    for kernel in ("eager", "sdpa"):
        student, _ = load_model(
            ModelArguments(preset="tiny", attn_implementation=kernel), tokenizer
        )
        assert (
            load_teacher(student, str(tiny_checkpoint), block_size=64).config._attn_implementation
            == kernel
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--distill_share", 0],
            "error: --distill_share is the teacher's part of each training target, in (0, 1]; "
            "got 0.0. Pass e.g. --distill_share 0.5",
        ),
        (
            ["--distill_from", "./no-such-teacher"],
            "error: --distill_from './no-such-teacher' does not exist; pass a checkpoint folder",
        ),
    ],
)
def test_bad_distillation_arguments_exit_2_with_one_line(
    micro_files, tmp_path, monkeypatch, capsys, extra, message
):
    out = tmp_path / "run"
    assert train_in_process(micro_args(micro_files, out, *extra, max_steps=2), monkeypatch) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(message)
    assert not (out / "model.safetensors").exists()


def test_a_teacher_with_a_shorter_context_is_refused(
    micro_files, tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = micro_args(micro_files, out, "--distill_from", tiny_checkpoint, max_steps=2)
    argv[argv.index("--block_size") + 1] = 256  # longer than the teacher's 128 positions
    assert train_in_process(argv, monkeypatch) == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            f"error: --distill_from {str(tiny_checkpoint)!r} reads at most 128 tokens but the "
            "blocks hold 256; pass --block_size 128"
        )
    )


SPLIT_FIX = (
    "train the teacher with the student's --seed and --validation_split_percentage, or drop "
    "--distill_from"
)


def held_out_args(files, out, *extra, **kwargs) -> list:
    """micro_args without --validation_file: validation articles are held out of train_file."""
    argv = micro_args(files, out, *extra, **kwargs)
    at = argv.index("--validation_file")
    return argv[:at] + argv[at + 2 :]


@pytest.fixture(scope="module")
def split_teacher(tmp_path_factory, micro_files):
    """A 1-step run holding out 5% of the training file's articles by --seed 42: its folder and its
    checkpoint-1 hold wikigpt_run.json."""
    out = tmp_path_factory.mktemp("split-teacher") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert (
            train_in_process(
                held_out_args(micro_files, out, max_steps=1, save_steps=1), monkeypatch
            )
            == 0
        )
    return out


def student_split(files, *extra) -> dict:
    """The split record of the student run these flags describe, as train.py builds it."""
    from wikigpt.train.run import parse_run_args

    _, data_args, _, _, training_args = parse_run_args(
        [str(a) for a in held_out_args(files, "unused", *extra)]
    )
    return split_record(data_args, training_args)


@pytest.mark.parametrize(
    "extra, flag, there, here, folder",
    [
        (["--seed", 7], "seed", "42", "7", ""),
        (
            ["--validation_split_percentage", 10],
            "validation_split_percentage",
            "5.0",
            "10.0",
            "checkpoint-1",
        ),
    ],
)
def test_a_teacher_trained_on_another_split_is_refused(
    micro_files, split_teacher, tmp_path, monkeypatch, capsys, extra, flag, there, here, folder
):
    teacher = split_teacher / folder if folder else split_teacher
    out = tmp_path / "run"
    argv = held_out_args(micro_files, out, "--distill_from", teacher, *extra, max_steps=1)
    assert train_in_process(argv, monkeypatch) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --distill_from {str(teacher)!r} was trained with --{flag} {there} and this run "
        f"has {here}, so it may have trained on this run's held-out articles; {SPLIT_FIX}"
    )
    assert not out.exists()


def test_an_older_teacher_run_whose_results_show_another_split_is_refused(
    micro_files, split_teacher, tmp_path, tokenizer, monkeypatch, capsys
):
    from wikigpt.data.blocks import DataArguments, load_raw_splits, prepare_lm_splits

    teacher = tmp_path / "teacher"  # a run of an older wikigpt: results.json, no wikigpt_run.json
    shutil.copytree(split_teacher, teacher)
    for record in teacher.rglob("wikigpt_run.json"):
        record.unlink()
    there = json.loads((teacher / "results.json").read_text())["data"]
    raw = load_raw_splits(DataArguments(train_file=str(micro_files["train"])), 7)
    _, here = prepare_lm_splits(raw, tokenizer, 32)
    argv = held_out_args(
        micro_files, tmp_path / "run", "--distill_from", teacher, "--seed", 7, max_steps=1
    )
    assert train_in_process(argv, monkeypatch) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --distill_from {str(teacher)!r} was trained on train/validation splits of "
        f"{there['train']['tokens']:,} / {there['validation']['tokens']:,} tokens (its "
        f"results.json) and this run has {here['train']['tokens']:,} / "
        f"{here['validation']['tokens']:,}, so it may have trained on this run's held-out "
        f"articles; {SPLIT_FIX}"
    )


def test_a_teacher_with_the_students_split_is_taken_silently(
    micro_files, split_teacher, tokenizer, caplog
):
    student, _ = load_model(ModelArguments(preset="tiny"), tokenizer)
    split = student_split(micro_files)
    with caplog.at_level(logging.INFO, logger="wikigpt.objectives.distillation"):
        for teacher in (split_teacher, split_teacher / "checkpoint-1"):
            assert load_teacher(student, str(teacher), block_size=32, split=split) is not None
    assert [
        r.getMessage() for r in caplog.records if r.name == "wikigpt.objectives.distillation"
    ] == []


def test_a_teacher_without_a_record_is_taken_with_a_notice(
    micro_files, tiny_checkpoint, tokenizer, caplog
):
    student, _ = load_model(ModelArguments(preset="tiny"), tokenizer)
    with caplog.at_level(logging.INFO, logger="wikigpt.objectives.distillation"):
        load_teacher(student, str(tiny_checkpoint), block_size=32, split=student_split(micro_files))
    assert [
        r.getMessage() for r in caplog.records if r.name == "wikigpt.objectives.distillation"
    ] == [
        f"--distill_from {str(tiny_checkpoint)!r} has no record of its training split; if it "
        f"trained on this run's held-out articles, every held-out number of this run is biased"
    ]
