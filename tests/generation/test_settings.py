"""wikigpt/generation/settings.py: flags > checkpoint > fallbacks, range and combination checks with
their messages."""

from types import SimpleNamespace

import pytest
from transformers import GenerationConfig

from wikigpt.cli import parse_args
from wikigpt.errors import UsageError
from wikigpt.generation.sampling import build_generation_config, public_settings
from wikigpt.generation.settings import (
    FALLBACKS,
    GenerateArguments,
    check_arguments,
    check_settings,
    resolve_settings,
)


def args_for(*argv) -> GenerateArguments:
    (args,) = parse_args((GenerateArguments,), [str(a) for a in argv])
    return args


def test_resolve_settings_layers():
    saved = GenerationConfig(do_sample=False, max_new_tokens=7, top_k=5)
    settings, from_checkpoint = resolve_settings(args_for("--top_k", 9), saved)
    assert settings == {**FALLBACKS, "do_sample": False, "max_new_tokens": 7, "top_k": 9}
    assert from_checkpoint == {"do_sample", "max_new_tokens"}
    assert resolve_settings(args_for(), None)[0] == FALLBACKS  # sampling, top_k 50, 100 new tokens
    assert resolve_settings(args_for("--num_beams", 4), None)[0]["do_sample"] is False
    assert resolve_settings(args_for("--num_beams", 4, "--do_sample"), None)[0]["do_sample"] is True
    settings, _ = resolve_settings(
        args_for("--greedy"), GenerationConfig(do_sample=True, temperature=0.7)
    )
    assert settings["do_sample"] is False and "temperature" not in public_settings(settings)
    # The checkpoint's sampling knobs are not merged into greedy decoding (generate() would warn
    # about them).
    assert (
        build_generation_config(
            settings, [], SimpleNamespace(pad_token_id=50256), [50256]
        ).temperature
        == 1.0
    )


def test_repeated_flags_and_escapes():
    args = args_for(
        "--prompt",
        "Q: Who?",
        "--prompt",
        "two",
        "words",
        "--prompt",
        "",
        "--stop",
        r"\n\n",
        "--stop",
        "A:",
        "--do_sample",
    )
    assert args.prompt == ["Q: Who?", "two words", ""]
    assert args.stop == ["\n\n", "A:"] and args.do_sample is True
    assert args_for("--do_sample", "false").do_sample is False and args_for().do_sample is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ("--temperature", 0),
            "--temperature 0.0 must be > 0 when sampling; for greedy decoding pass --greedy",
        ),
        (("--do_sample", "--temperature", -1), "--temperature -1.0 must be > 0 when sampling"),
        (("--top_p", 0), "--top_p 0.0 must be in (0, 1] (1 turns nucleus sampling off)"),
        (("--top_p", 1.5), "--top_p 1.5 must be in (0, 1]"),
        (("--top_k", -1), "--top_k -1 must be >= 0 (0 turns top-k filtering off)"),
        (("--typical_p", 2), "--typical_p 2.0 must be in (0, 1]"),
        (("--max_new_tokens", 0), "--max_new_tokens 0 must be >= 1"),
        (("--num_beams", 0), "--num_beams 0 must be >= 1"),
        (("--greedy", "--do_sample"), "--greedy and --do_sample contradict each other"),
        (
            ("--prompt_file", "/no/such/prompts.txt"),
            "--prompt_file '/no/such/prompts.txt' does not exist",
        ),
        (("--stop", ""), '--stop "" would stop at once'),
    ],
)
def test_argument_errors(argv, message):
    with pytest.raises(UsageError) as err:
        check_arguments(args_for(*argv))
    assert str(err.value).startswith(message)


def test_greedy_ignores_temperature():
    check_arguments(args_for("--greedy", "--temperature", 0))


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ("--num_beams", 2, "--num_return_sequences", 3),
            "--num_return_sequences 3 is more than --num_beams 2; beam search returns at most one "
            "sequence per beam",
        ),
        (
            ("--greedy", "--num_return_sequences", 2),
            "--num_return_sequences 2 with greedy decoding would repeat one sequence; add "
            "--do_sample, or --num_beams 2",
        ),
        (
            ("--max_new_tokens", 128),
            "--max_new_tokens 128 leaves no room for a prompt in the model's context of 128 "
            "tokens; use at most 127",
        ),
    ],
)
def test_setting_errors(argv, message):
    settings, from_checkpoint = resolve_settings(args_for(*argv), None)
    with pytest.raises(UsageError) as err:
        check_settings(settings, from_checkpoint, context=128)
    assert str(err.value).startswith(message)


def test_bad_value_from_checkpoint_says_so():
    settings, from_checkpoint = resolve_settings(
        args_for(), GenerationConfig(do_sample=True, temperature=0.0)
    )
    with pytest.raises(
        UsageError,
        match=r"--temperature 0.0 must be > 0 .* comes from the checkpoint's "
        r"generation_config.json",
    ):
        check_settings(settings, from_checkpoint, context=128)
