"""--push_to_hub offline: training finishes, everything is saved locally, then one error line and a
non-zero exit.

The same run checks what every run leaves in its output dir: model card, training-curve PNG,
throughput totals.
"""

import json

import pytest
from conftest import run_script, tiny_train_args
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from wikigpt.reporting.hub import defer_push, push_after_local_save
from wikigpt.train.arguments import WikiTrainingArguments


@pytest.fixture(scope="module")
def offline_push_run(tmp_path_factory, small_files):
    out = tmp_path_factory.mktemp("push") / "run"
    proc = run_script(
        "train.py",
        *tiny_train_args(
            small_files,
            out,
            "--test_file",
            small_files["test"],
            "--push_to_hub",
            "--hub_model_id",
            "someone/wikigpt-tiny",
            "--hub_private_repo",
            "true",
            "--peak_flops",
            "1e12",
        ),
    )
    return out, proc


def test_push_fails_offline_with_one_line_after_the_local_save(offline_push_run):
    out, proc = offline_push_run
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert errors[0].startswith(
        "error: --push_to_hub could not upload to the Hub repo 'someone/wikigpt-tiny' "
        "(OfflineModeIsEnabled: "
    )
    assert (
        f"nothing is lost: the model, results.json and README.md are saved in '{out}'" in errors[0]
    )
    assert (
        f"`hf upload someone/wikigpt-tiny {out} --exclude '_*' --exclude 'checkpoint-*' --exclude "
        "'corrupt-*' --exclude 'previous-run-*'`"
    ) in errors[0]
    # nothing lost: the model loads, results and card are complete
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == 2
    results = json.loads((out / "results.json").read_text())
    assert results["hub_model_id"] == "someone/wikigpt-tiny"


def test_every_run_writes_a_model_card_with_its_perplexities(offline_push_run):
    out, _ = offline_push_run
    results = json.loads((out / "results.json").read_text())
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None  # trained from scratch
    assert card.data.model_name == "someone/wikigpt-tiny"
    by_split = {r.dataset_split: r for r in card.data.eval_results}
    assert set(by_split) == {"validation", "test"}
    assert by_split["validation"].metric_value == round(results["validation"]["eval_perplexity"], 4)
    assert by_split["test"].metric_value == round(results["test"]["test_perplexity"], 4)
    assert by_split["test"].metric_args["block_size"] == 64
    assert by_split["test"].metric_args["tokens"] == results["test"]["test_tokens"]
    assert results["test"]["test_blocks"] == results["data"]["test"]["blocks"]
    assert results["test"]["test_tokens"] == results["data"]["test"]["blocks"] * 63
    assert 'from_pretrained("someone/wikigpt-tiny")' in card.text
    assert f"{6 * 4 * 64:,} (6 optimizer steps of 256 tokens)" in card.text


def test_every_run_writes_training_curves_png(offline_push_run):
    out, _ = offline_push_run
    assert (out / "training_curves.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_tokens_per_second_and_mfu_are_logged_and_totalled(offline_push_run):
    out, proc = offline_push_run
    results = json.loads((out / "results.json").read_text())
    t = results["throughput"]
    assert t["tokens"] == 6 * 4 * 64 and t["devices"] == 1 and t["device_name"] == "cpu"
    assert t["peak_flops_per_device"] == 1e12 and t["peak_flops_source"] == "--peak_flops"
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 4  # steps 1, 2, 4, 6
    assert all({"tokens_per_second", "mfu"} <= set(h) for h in train_logs)
    assert "'tokens_per_second'" in proc.stdout  # the printed log lines show it too


def test_defer_push_turns_the_trainer_push_off():
    args = WikiTrainingArguments(output_dir="unused", push_to_hub=True, hub_model_id="a/b")
    assert defer_push(args) is True and args.push_to_hub is False
    assert defer_push(WikiTrainingArguments(output_dir="unused")) is False


def test_push_uploads_the_model_but_nothing_set_aside(tmp_path, monkeypatch):
    # The Hub is offline: the repo creation and the commit are recorded instead of sent; the list of
    # files is huggingface_hub's own, after upload_folder applied the ignore patterns.
    import torch
    from huggingface_hub import CommitInfo, HfApi, RepoUrl
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer

    out = tmp_path / "run"
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=50, n_positions=16)
    )
    model.save_pretrained(out)
    (out / "results.json").write_text("{}")
    for folder in (
        "checkpoint-8",
        "corrupt-checkpoint-6",
        "corrupt-2-checkpoint-6",
        "previous-run-checkpoint-10",
        "_scratch",
    ):
        (out / folder).mkdir()
        torch.save({"state": 1}, out / folder / "optimizer.pt")
    uploaded = []

    def create_commit(self, repo_id, operations, **kwargs):
        uploaded.extend(op.path_in_repo for op in operations)
        return CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0",
            commit_message="",
            commit_description="",
            oid="0" * 40,
        )

    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}"),
    )
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(
        "huggingface_hub.hf_api.is_xet_available", lambda: False
    )  # one commit, no xet upload
    args = WikiTrainingArguments(
        output_dir=str(out),
        hub_model_id="someone/wikigpt-tiny",
        eval_strategy="no",
        report_to="none",
    )
    push_after_local_save(Trainer(model=model, args=args))
    assert sorted(uploaded) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "results.json",
    ]
