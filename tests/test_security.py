"""Safe by default: no remote code, no unpickling of weights, no token in any file or log line."""

import json

import pytest
import torch
from runs import micro_args, micro_files, train_in_process  # noqa: F401 - micro_files is a fixture
from transformers import GPT2Config, GPT2LMHeadModel

from wikigpt.errors import UsageError
from wikigpt.model import ModelArguments, load_causal_lm


def tiny_model():
    return GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=100, n_positions=32)
    )


def test_pickle_only_checkpoint_needs_allow_pickle(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(UsageError) as err:
        load_causal_lm(str(tmp_path), flag="--model_name_or_path")
    assert str(err.value) == (
        f"--model_name_or_path {str(tmp_path)!r} holds only pickle weights (pytorch_model.bin), "
        "which can run code when loaded; convert them to safetensors, or pass --allow_pickle if "
        "you trust the source"
    )
    loaded = load_causal_lm(str(tmp_path), flag="--model_name_or_path", allow_pickle=True)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    assert ModelArguments().allow_pickle is False


def test_remote_code_in_a_checkpoint_does_not_run_by_default(tmp_path):
    model_dir, marker = tmp_path / "model", tmp_path / "code-ran"
    tiny_model().save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class EvilConfig(GPT2Config): pass\n"
        "class EvilModel(GPT2LMHeadModel): config_class = EvilConfig\n"
    )
    assert ModelArguments().trust_remote_code is False
    assert type(load_causal_lm(str(model_dir), flag="--model_name_or_path")) is GPT2LMHeadModel
    assert not marker.exists()
    trusted = load_causal_lm(str(model_dir), flag="--model_name_or_path", trust_remote_code=True)
    assert (
        type(trusted).__name__ == "EvilModel" and marker.exists()
    )  # the opt-in really runs it: the default is what keeps it from running


def test_hub_token_is_never_written_or_printed(tmp_path, micro_files, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", "hf_envSECRETenv")
    out = tmp_path / "run"
    argv = micro_args(micro_files, out, "--hub_token", "hf_argSECRETarg", max_steps=2, save_steps=1)
    assert train_in_process(argv, monkeypatch) == 0
    printed = capsys.readouterr()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"results.json", "training_args.bin", "trainer_state.json"} <= {p.name for p in files}
    assert (out / "checkpoint-2" / "training_args.bin").exists()
    for text in (printed.out, printed.err, caplog.text):
        assert "SECRET" not in text
    for (
        path
    ) in files:  # training_args.bin is a pickle of the arguments: the token must not be in it
        assert b"SECRET" not in path.read_bytes(), path
