"""Prompts in: read from --prompt, --prompt_file (text or JSONL) or stdin, and encoded to fit the
model's context."""

from __future__ import annotations

import json
import logging

from wikigpt.errors import UsageError

logger = logging.getLogger("wikigpt.generate")  # generate.py's log lines name it

PROMPT_FILE_HINT = (
    'pass a text file with one prompt per line, or a .jsonl file with a "prompt" field per line'
)


def read_prompt_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not path.endswith(".jsonl"):
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(
                    f"--prompt_file {path!r} line {number} is not valid JSON ({err}); "
                    f"write one JSON object per line"
                ) from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UsageError(
                    f'--prompt_file {path!r} line {number} has no "prompt" string; '
                    f'write e.g. {{"prompt": "The meaning of life is"}}'
                )
            prompts.append(record["prompt"])
    if not prompts:
        raise UsageError(f"--prompt_file {path!r} holds no prompts; {PROMPT_FILE_HINT}")
    return prompts


def read_prompts(args, stdin=None) -> list[str]:
    """--prompt (in order), then --prompt_file; else stdin when it is piped; else one unconditional
    sample."""
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts and stdin is not None and not stdin.isatty():
        text = stdin.read()
        if text.strip():
            prompts.append(
                text.removesuffix("\n")
            )  # the newline `echo` adds is not part of the prompt
    if not prompts:
        logger.info("no prompt given (--prompt, --prompt_file or stdin): sampling unconditionally")
        prompts = [""]
    return prompts


def start_token_id(tokenizer) -> int:
    token_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    if token_id is None:
        raise UsageError(
            "an empty prompt starts from the tokenizer's bos/eos token, and --tokenizer_name has "
            "neither; pass a non-empty --prompt"
        )
    return token_id


def encode_prompts(
    tokenizer, prompts: list[str], max_prompt_tokens: int, context: int
) -> list[list[int]]:
    """Token ids per prompt; "" becomes <|endoftext|> (bos); too long keeps its end and warns."""
    encoded = []
    for number, prompt in enumerate(prompts, start=1):
        ids = (
            tokenizer(prompt, verbose=False)["input_ids"] if prompt else [start_token_id(tokenizer)]
        )
        if len(ids) > max_prompt_tokens:
            logger.warning(
                "prompt %d has %d tokens; keeping its last %d so that prompt + --max_new_tokens "
                "fits the model's context of %d tokens",
                number,
                len(ids),
                max_prompt_tokens,
                context,
            )
            ids = ids[-max_prompt_tokens:]
        encoded.append(ids)
    return encoded
