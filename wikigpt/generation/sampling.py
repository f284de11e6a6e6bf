"""Sampling: settings -> GenerationConfig -> model.generate -> finished samples (stop strings cut,
finish reason).

All decoding is `model.generate` with a `GenerationConfig` built from the settings of
wikigpt.generation.settings. Batches are left-padded with an attention mask (GPT-2 has no pad token,
so pad = eos); a prompt's greedy continuation is then the same whichever prompts share its batch.
Also: streaming to stdout or to another thread (the web demo), and the JSONL file of records.
"""

import json
import logging
import os
import queue
import sys
import threading
import time

import torch
from transformers import GenerationConfig, StoppingCriteria, TextStreamer

from wikigpt.errors import UsageError
from wikigpt.generation.settings import FALLBACKS, SAMPLING_ONLY, GenerateArguments

logger = logging.getLogger("wikigpt.generate")


def for_batched_generation(tokenizer):
    """The tokenizer from model.load_pretrained, set up for batched generation: pad = eos, left
    padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(
                "--tokenizer_name has neither a pad nor an eos token, so prompts cannot be "
                "batched; use a tokenizer that has one"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # new tokens must follow the prompt directly
    return tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = tokenizer.eos_token_id if eos is None else eos
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


def build_generation_config(
    settings: dict, stop: list[str], tokenizer, eos_ids: list[int]
) -> GenerationConfig:
    """Unset fields fall back to the model's own generation_config inside generate().

    transformers' own checks run too (validate, strict: what it would only warn about is an error).
    They come after check_settings, which names the flag to change and catches what validate() lets
    through (a negative temperature, greedy decoding asked for several sequences).
    """
    values = {k: v for k, v in settings.items() if k in FALLBACKS}
    if not settings["do_sample"]:
        # transformers' neutral values: otherwise generate() merges in the checkpoint's sampling
        # knobs and warns.
        values.update({k: FALLBACKS[k] for k in SAMPLING_ONLY})
    config = GenerationConfig(
        **values,
        stop_strings=stop or None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids or None,
        use_cache=True,
    )
    try:
        config.validate(strict=True)
    except ValueError as err:
        raise UsageError(
            f"transformers rejects these generation settings: {' '.join(str(err).split())}"
        ) from err
    return config


def generate_batch(
    model,
    tokenizer,
    batch: list[list[int]],
    config: GenerationConfig,
    streamer=None,
    stopping_criteria=None,
) -> list[list[int]]:
    """New token ids of every sample, prompt-major (prompt 0's sequences first), with padding."""
    inputs = tokenizer.pad(
        {"input_ids": batch}, padding=True, padding_side="left", return_tensors="pt"
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            generation_config=config,
            tokenizer=tokenizer,
            streamer=streamer,
            stopping_criteria=stopping_criteria,
        )
    return output[:, inputs["input_ids"].shape[1] :].tolist()


def find_stop(text: str, stops: list[str], before: str = "") -> int | None:
    """Where `text` must be cut: the start of the first stop string in it. A stop string may begin
    in `before` (the prompt): generation stops there too, and the cut is then at 0."""
    cuts = []
    for stop in stops:
        lead = before[len(before) - len(stop) + 1 :] if len(stop) > 1 else ""
        at = (lead + text).find(stop)
        if at >= 0:
            cuts.append(max(0, at - len(lead)))
    return min(cuts) if cuts else None


def finish_sample(
    new_ids: list[int],
    tokenizer,
    *,
    eos_ids: list[int],
    stops: list[str],
    max_new_tokens: int,
    prompt: str = "",
) -> tuple[str, int, str]:
    """(completion, new tokens, finish reason) of one sample from its generated ids (padded to the
    batch's length)."""
    end, hit_eos = len(new_ids), False
    for i, token in enumerate(new_ids):
        if token in eos_ids or token == tokenizer.pad_token_id:
            end, hit_eos = i, token in eos_ids
            break
    text = tokenizer.decode(new_ids[:end], skip_special_tokens=True)
    cut = find_stop(text, stops, prompt)
    if cut is not None:  # an eos right after a stop string is padding (pad = eos), not generated
        return text[:cut], end, "stop_string"
    if hit_eos:
        return text, end + 1, "eos"
    # Stopped short without eos: a stop string that began in the prompt ended the sample.
    return text, end, "length" if end >= max_new_tokens else "stop_string"


class StopStringStreamer(TextStreamer):
    """TextStreamer that never prints a stop string: text that could start one is held back until it
    cannot."""

    def __init__(self, tokenizer, stops: list[str], out=None):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stops, self.out = stops, out or sys.stdout
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending, self.stopped = "", False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.stopped:
            return
        self.pending += text
        cut = find_stop(self.pending, self.stops)
        if cut is not None:
            self.pending, self.stopped = self.pending[:cut], True
        keep = 0 if (stream_end or self.stopped) else self.hold
        split = max(0, len(self.pending) - keep)
        ready, self.pending = self.pending[:split], self.pending[split:]
        self.out.write(ready)
        self.out.flush()


def sample(
    model,
    tokenizer,
    prompts: list[str],
    encoded: list[list[int]],
    settings: dict,
    stop: list[str],
    batch_size: int,
    stream_to=None,
    stopping_criteria=None,
):
    """Yield, per batch, one record per sample: prompt, completion, new_tokens, finish_reason,
    seconds (the batch's)."""
    eos_ids = eos_token_ids(model, tokenizer)
    config = build_generation_config(settings, stop, tokenizer, eos_ids)
    sequences = settings["num_return_sequences"]
    for first in range(0, len(prompts), batch_size):
        batch = encoded[first : first + batch_size]
        streamer = StopStringStreamer(tokenizer, stop, stream_to) if stream_to is not None else None
        start = time.perf_counter()
        new_ids = generate_batch(model, tokenizer, batch, config, streamer, stopping_criteria)
        seconds = time.perf_counter() - start
        records = []
        for row, ids in enumerate(new_ids):
            index = first + row // sequences
            completion, new_tokens, reason = finish_sample(
                ids,
                tokenizer,
                eos_ids=eos_ids,
                stops=stop,
                max_new_tokens=settings["max_new_tokens"],
                prompt=prompts[index],
            )
            records.append(
                {
                    "prompt_index": index,
                    "sample_index": row % sequences,
                    "prompt": prompts[index],
                    "completion": completion,
                    "new_tokens": new_tokens,
                    "finish_reason": reason,
                    "prompt_tokens": len(encoded[index]),
                    "seconds": round(seconds, 4),
                }
            )
        yield records


class CancelCriteria(StoppingCriteria):
    """Ends generation at the next token once `event` is set (a user pressed Stop)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class _QueueOut:
    """A file-like target for StopStringStreamer that hands each written piece to another thread."""

    def __init__(self):
        self.pieces = queue.Queue()

    def write(self, text: str) -> None:
        if text:
            self.pieces.put(text)

    def flush(self) -> None:
        pass


def stream_sample(
    model,
    tokenizer,
    prompt: str,
    prompt_ids: list[int],
    settings: dict,
    stop: list[str],
    cancel: threading.Event | None = None,
):
    """One prompt, one sequence, as a generator: yields the completion's text pieces as generate.py
    prints them (stop strings held back), then sample()'s record (a dict). Setting `cancel`, or
    closing the generator, ends generation at the next token. For callers that cannot read from a
    streamed stdout (e.g. a web page)."""
    cancel = cancel or threading.Event()
    out, finished, result = _QueueOut(), object(), {}

    def run():
        try:
            (result["record"],) = next(
                sample(
                    model,
                    tokenizer,
                    [prompt],
                    [prompt_ids],
                    settings,
                    stop,
                    1,
                    stream_to=out,
                    stopping_criteria=[CancelCriteria(cancel)],
                )
            )
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread below
            result["error"] = err
        finally:
            out.pieces.put(finished)

    worker = threading.Thread(target=run, name="wikigpt-generate", daemon=True)
    worker.start()
    drained = False
    try:
        while (piece := out.pieces.get()) is not finished:
            yield piece
        drained = True
    finally:
        if not drained:
            cancel.set()  # a consumer that stops reading early stops the model too
        worker.join()
    if "error" in result:
        raise result["error"]
    yield result["record"]


def can_stream(args: GenerateArguments, prompts: list[str], settings: dict) -> bool:
    # TextStreamer takes one sequence; generate() refuses a streamer with beam search.
    return (
        args.stream
        and len(prompts) == 1
        and settings["num_return_sequences"] == 1
        and settings["num_beams"] == 1
    )


def public_settings(settings: dict, **extra) -> dict:
    """What a record says was used: sampling knobs only when sampling."""
    shown = {k: v for k, v in settings.items() if settings["do_sample"] or k not in SAMPLING_ONLY}
    return {**shown, **extra}


class JsonlWriter:
    """Records go to PATH.partial as they come (an interrupted run keeps them); renamed to PATH when
    done."""

    def __init__(self, path: str):
        self.path, self.partial = path, path + ".partial"

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file = open(self.partial, "w", encoding="utf-8")
        return self

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def __exit__(self, exc_type, exc, tb):
        self.file.close()
        if exc_type is None:
            os.replace(self.partial, self.path)
        else:
            logger.warning("stopped early; the samples written so far are in %s", self.partial)
        return False
