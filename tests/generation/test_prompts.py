"""wikigpt/generation/prompts.py: where prompts come from (flags, text or JSONL file, stdin) and how
they are encoded."""

import io

from wikigpt.cli import parse_args
from wikigpt.generation.settings import GenerateArguments
from wikigpt.generation.prompts import encode_prompts, read_prompts


def args_for(*argv) -> GenerateArguments:
    (args,) = parse_args((GenerateArguments,), [str(a) for a in argv])
    return args


def test_prompt_sources(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("first prompt\n\n  \nsecond: with {braces}\n", encoding="utf-8")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "a\\nb", "id": 1}\n\n{"prompt": ""}\n', encoding="utf-8")

    assert read_prompts(args_for("--prompt", "x", "--prompt_file", text)) == [
        "x",
        "first prompt",
        "second: with {braces}",
    ]
    assert read_prompts(args_for("--prompt_file", jsonl)) == ["a\nb", ""]
    assert read_prompts(args_for(), io.StringIO("TL;DR:\n")) == ["TL;DR:"]
    assert read_prompts(args_for("--prompt", "given"), io.StringIO("ignored")) == ["given"]
    assert read_prompts(args_for(), io.StringIO("")) == [
        ""
    ]  # nothing at all: one unconditional sample

    tty = io.StringIO("never read")
    tty.isatty = lambda: True
    assert read_prompts(args_for(), tty) == [""]


def test_empty_prompt_starts_from_endoftext(tokenizer):
    assert encode_prompts(tokenizer, ["", "Hello world"], 100, 128) == [[50256], [15496, 995]]
