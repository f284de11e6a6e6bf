"""generate.py / wikigpt/generation/sampling.py: batching, seeds, stop strings, JSONL records,
errors end to end.

Settings and their checks: test_generation_settings.py; reading and encoding prompts:
test_prompts.py."""

import io
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

import generate
from wikigpt.cli import parse_args
from wikigpt.errors import UsageError, run_main
from wikigpt.generation.sampling import (
    StopStringStreamer,
    build_generation_config,
    finish_sample,
    for_batched_generation,
    generate_batch,
)
from wikigpt.generation.settings import FALLBACKS, GenerateArguments, resolve_settings
from wikigpt.model import load_pretrained

PROMPTS = ["Hello world, this is a long prompt with many words", "Hi", "The capital of France is"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """Tiny GPT-2 (context 128) whose random weights are large enough that greedy text varies token
    to token."""
    d = tmp_path_factory.mktemp("varied-checkpoint")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=128,
        vocab_size=len(tokenizer),
        initializer_range=0.5,
    )
    GPT2LMHeadModel(config).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tokenizer = load_pretrained(str(checkpoint), device=torch.device("cpu"))
    return model, for_batched_generation(tokenizer)


def args_for(*argv) -> GenerateArguments:
    (args,) = parse_args((GenerateArguments,), [str(a) for a in argv])
    return args


def call_generate(monkeypatch, capsys, *argv, stdin=""):
    """generate.py in-process (no interpreter start-up): (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["generate.py", *map(str, argv)])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        run_main(generate.main)
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(*argv, input=""):
    """generate.py as a user runs it; stdin is always given so the child never waits on the
    terminal."""
    return subprocess.run(
        [sys.executable, str(REPO / "generate.py"), *map(str, argv)],
        cwd=REPO,
        input=input,
        capture_output=True,
        text=True,
        timeout=300,
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- batching and seeds ---------------------------------------------------------------------------


def test_greedy_batch_equals_each_prompt_alone(loaded):
    model, tokenizer = loaded
    settings, _ = resolve_settings(
        args_for("--greedy", "--max_new_tokens", 12), model.generation_config
    )
    config = build_generation_config(settings, [], tokenizer, [tokenizer.eos_token_id])
    config.eos_token_id = (
        None  # the random model may emit <|endoftext|>; compare all 12 tokens of every prompt
    )
    encoded = [tokenizer(p)["input_ids"] for p in PROMPTS]
    assert (
        len({len(ids) for ids in encoded}) == 3
    )  # prompts of different lengths: the batch is padded

    batch = generate_batch(model, tokenizer, encoded, config)
    alone = [generate_batch(model, tokenizer, [ids], config)[0] for ids in encoded]
    assert batch == alone
    assert all(len(ids) == 12 for ids in batch) and len({tuple(ids) for ids in batch}) == 3

    # The same batch padded on the right (the classic GPT-2 trap) changes a short prompt's
    # continuation, so the equality above does depend on left padding and the attention mask.
    tokenizer.padding_side = "right"
    try:
        inputs = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        wrong = model.generate(**inputs, generation_config=config)[
            :, inputs["input_ids"].shape[1] :
        ].tolist()
    finally:
        tokenizer.padding_side = "left"
    assert wrong != alone


def test_same_seed_same_samples(monkeypatch, capsys, checkpoint, tmp_path):
    def run(seed, name):
        out = tmp_path / name
        code, _, err = call_generate(
            monkeypatch,
            capsys,
            "--model",
            checkpoint,
            "--prompt",
            "The",
            "--prompt",
            "A",
            "--num_return_sequences",
            2,
            "--max_new_tokens",
            8,
            "--seed",
            seed,
            "--output_file",
            out,
        )
        assert code == 0, err
        return [r["completion"] for r in read_jsonl(out)]

    first, again, other = run(7, "a.jsonl"), run(7, "b.jsonl"), run(8, "c.jsonl")
    assert first == again and len(first) == 4
    assert first != other
    assert first[0] != first[1]  # two samples of one prompt differ: it is sampling


# --- end to end -----------------------------------------------------------------------------------


def test_cli_streams_from_stdin_and_reports_speed(tiny_checkpoint, tmp_path):
    """A real process: prompt piped on stdin, streamed to stdout, tokens/s on stderr, record in the
    JSONL."""
    out = tmp_path / "one.jsonl"
    proc = run_cli(
        "--model",
        tiny_checkpoint,
        "--max_new_tokens",
        6,
        "--seed",
        3,
        "--output_file",
        out,
        input="Valkyria Chronicles III is\n",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = read_jsonl(out)
    assert record["prompt"] == "Valkyria Chronicles III is"
    assert proc.stdout == record["prompt"] + record["completion"] + "\n"
    assert record["new_tokens"] == 6 and record["finish_reason"] == "length"
    assert record["settings"]["seed"] == 3 and record["settings"]["device"] == "cpu"
    assert "tokens/s" in proc.stderr and "error" not in proc.stderr


def test_records_stop_strings_and_unconditional_sample(
    monkeypatch, capsys, loaded, checkpoint, tmp_path
):
    model, tokenizer = loaded
    prompt = "The capital of France is"
    # Greedy text of this random model, to pick a stop string it is sure to produce.
    greedy = tokenizer.decode(
        generate_batch(
            model,
            tokenizer,
            [tokenizer(prompt)["input_ids"]],
            GenerationConfig(
                max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
            ),
        )[0]
    )
    words = greedy.split(" ")
    stop = (
        " " + words[3] + " " + words[4]
    )  # several tokens long: the streamer must hold back a partial match
    expected = greedy[: greedy.index(stop)]
    assert expected

    out = tmp_path / "records.jsonl"
    code, stdout, err = call_generate(
        monkeypatch,
        capsys,
        "--model",
        checkpoint,
        "--greedy",
        "--prompt",
        prompt,
        "--prompt",
        "",
        "--max_new_tokens",
        12,
        "--stop",
        stop,
        "--output_file",
        out,
    )
    assert code == 0, err
    records = read_jsonl(out)
    assert [r["prompt"] for r in records] == [prompt, ""]
    assert records[0]["completion"] == expected and records[0]["finish_reason"] == "stop_string"
    assert records[0]["new_tokens"] == len(tokenizer(expected + stop)["input_ids"])
    assert records[1]["prompt_tokens"] == 1  # "" -> <|endoftext|>
    for record in records:
        assert set(record) == {
            "prompt_index",
            "sample_index",
            "prompt",
            "completion",
            "new_tokens",
            "finish_reason",
            "prompt_tokens",
            "seconds",
            "settings",
        }
        assert record["settings"]["do_sample"] is False and "temperature" not in record["settings"]
        assert record["settings"]["stop"] == [stop]
    assert f"=== prompt 1, sample 1 ===\n{prompt}{expected}\n=== prompt 2, sample 1 ===\n" in stdout
    assert not (tmp_path / "records.jsonl.partial").exists()

    # One prompt streams; the stop string is never printed, not even in part.
    code, stdout, err = call_generate(
        monkeypatch,
        capsys,
        "--model",
        checkpoint,
        "--greedy",
        "--prompt",
        prompt,
        "--max_new_tokens",
        12,
        "--stop",
        stop,
    )
    assert code == 0, err
    assert stdout == prompt + expected + "\n"


def test_long_prompt_is_left_truncated(monkeypatch, capsys, checkpoint, tmp_path, caplog):
    prompt = " ".join(f"w{i}" for i in range(150))  # > 128-token context
    out = tmp_path / "long.jsonl"
    code, stdout, err = call_generate(
        monkeypatch,
        capsys,
        "--model",
        checkpoint,
        "--prompt",
        prompt,
        "--max_new_tokens",
        8,
        "--output_file",
        out,
        "--no_stream",
        "--no_echo_prompt",
    )
    assert code == 0, err
    (record,) = read_jsonl(out)
    assert record["prompt"] == prompt and record["prompt_tokens"] == 120
    assert stdout == record["completion"] + "\n"
    assert (
        "keeping its last 120 so that prompt + --max_new_tokens fits the model's context of 128"
        in caplog.text
    )


def test_beam_search(monkeypatch, capsys, checkpoint, tmp_path):
    out = tmp_path / "beams.jsonl"
    code, _, err = call_generate(
        monkeypatch,
        capsys,
        "--model",
        checkpoint,
        "--prompt",
        "Hi",
        "--num_beams",
        3,
        "--num_return_sequences",
        2,
        "--max_new_tokens",
        5,
        "--output_file",
        out,
    )
    assert code == 0, err
    records = read_jsonl(out)
    assert [r["sample_index"] for r in records] == [0, 1]
    assert records[0]["completion"] != records[1]["completion"]
    assert records[0]["settings"]["num_beams"] == 3 and records[0]["settings"]["do_sample"] is False


def test_checkpoint_generation_config_gives_defaults_flags_override(
    monkeypatch, capsys, checkpoint, tmp_path
):
    own = tmp_path / "with-generation-config"
    shutil.copytree(checkpoint, own)
    GenerationConfig(
        do_sample=False, max_new_tokens=7, bos_token_id=50256, eos_token_id=50256
    ).save_pretrained(own)
    for extra, expected_tokens in (((), 7), (("--max_new_tokens", 4), 4)):
        out = tmp_path / f"gc-{expected_tokens}.jsonl"
        code, _, err = call_generate(
            monkeypatch, capsys, "--model", own, "--prompt", "Hi", "--output_file", out, *extra
        )
        assert code == 0, err
        (record,) = read_jsonl(out)
        assert (
            record["settings"]["do_sample"] is False
            and record["settings"]["max_new_tokens"] == expected_tokens
        )


# --- pieces ---------------------------------------------------------------------------------------


def test_finish_reasons(loaded):
    _, tokenizer = loaded  # pad = eos
    eos = tokenizer.eos_token_id
    ids = tokenizer(" one two\n\nthree four")["input_ids"]
    kw = dict(eos_ids=[eos], max_new_tokens=len(ids) + 2)
    assert finish_sample(ids + [eos, eos], tokenizer, stops=[], **kw) == (
        " one two\n\nthree four",
        len(ids) + 1,
        "eos",
    )
    assert finish_sample(ids, tokenizer, stops=[], **{**kw, "max_new_tokens": len(ids)}) == (
        " one two\n\nthree four",
        len(ids),
        "length",
    )
    # Stopped at "\n\n": the eos after it is padding, not a generated token.
    stop_ids = tokenizer(" one two\n\n")["input_ids"]
    assert finish_sample(stop_ids + [eos], tokenizer, stops=["\n\n", "zzz"], **kw) == (
        " one two",
        len(stop_ids),
        "stop_string",
    )
    # A stop string that begins in the prompt ("...A:\n" + "\n") cuts the completion to "".
    newline = tokenizer("\nB")["input_ids"]
    assert finish_sample(newline, tokenizer, stops=["\n\n"], prompt="Q: x\nA:\n", **kw) == (
        "",
        2,
        "stop_string",
    )


def test_generation_config_is_validated_strictly():
    """transformers' GenerationConfig.validate(strict=True) runs too: what it would only warn about
    fails."""
    with pytest.raises(
        UsageError, match="transformers rejects these generation settings: .*pad_token_id"
    ):
        build_generation_config(dict(FALLBACKS), [], SimpleNamespace(pad_token_id=-1), [50256])


def test_streamer_holds_back_a_possible_stop_string(tokenizer):
    out = io.StringIO()
    streamer = StopStringStreamer(tokenizer, ["\n\n"], out)
    written = []
    for chunk in ("Hello", " wor", "ld\n", "\nmore"):
        streamer.on_finalized_text(chunk)
        written.append(out.getvalue())
    streamer.on_finalized_text("", stream_end=True)
    assert written == ["Hell", "Hello wo", "Hello world", "Hello world"]
    assert out.getvalue() == "Hello world"

    out = io.StringIO()
    streamer = StopStringStreamer(tokenizer, ["STOP HERE"], out)
    for chunk in ("a", " STOP", " HE", "RE after"):
        streamer.on_finalized_text(chunk)
        assert "S" not in out.getvalue()
    streamer.on_finalized_text(" more", stream_end=True)
    assert out.getvalue() == "a "

    plain = io.StringIO()
    streamer = StopStringStreamer(tokenizer, [], plain)
    streamer.on_finalized_text("a\n\nb")
    streamer.on_finalized_text("c", stream_end=True)
    assert plain.getvalue() == "a\n\nbc"


def test_errors_end_to_end(monkeypatch, capsys, checkpoint, tmp_path):
    missing = tmp_path / "no-model"
    code, out, err = call_generate(monkeypatch, capsys, "--model", missing, "--prompt", "x")
    assert code == 2 and out == ""
    assert err.startswith(f"error: --model '{missing}' does not exist") and err.count("\n") == 1

    code, _, err = call_generate(monkeypatch, capsys, "--model", checkpoint, "--dtype", "float8")
    assert (code, err) == (
        2,
        "error: --dtype 'float8' is unknown; choose auto, float32, bfloat16, float16\n",
    )

    code, _, err = call_generate(
        monkeypatch,
        capsys,
        "--model",
        checkpoint,
        "--prompt",
        "x",
        "--num_beams",
        2,
        "--num_return_sequences",
        3,
    )  # checked after loading: no progress bar before it
    assert code == 2 and err.startswith(
        "error: --num_return_sequences 3 is more than --num_beams 2"
    )
    assert err.count("\n") == 1

    existing = tmp_path / "taken.jsonl"
    existing.write_text("keep me\n")
    code, _, err = call_generate(
        monkeypatch, capsys, "--model", checkpoint, "--output_file", existing
    )
    assert code == 2 and "--output_file" in err and existing.read_text() == "keep me\n"
