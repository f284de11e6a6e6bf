"""Sample from a causal LM checkpoint (model.generate): batched, streamed, reproducible, JSONL out.

    python generate.py --model out/tiny --prompt "The history of" --max_new_tokens 60
    python generate.py --model out/tiny --prompt_file prompts.jsonl --output_file out.jsonl --seed 1
    echo "Robert Boulter is" | python generate.py --model out/tiny --greedy

Settings: flags > the checkpoint's generation_config.json > wikigpt defaults (sampling, top_k 50,
100 new tokens).
"""

import contextlib
import logging
import os
import sys

from transformers import set_seed
from transformers.utils import logging as hf_logging

from wikigpt.cli import parse_args
from wikigpt.errors import run_main
from wikigpt.generation.sampling import (
    JsonlWriter,
    can_stream,
    for_batched_generation,
    public_settings,
    sample,
)
from wikigpt.generation.settings import (
    GenerateArguments,
    check_arguments,
    check_settings,
    resolve_device,
    resolve_settings,
)
from wikigpt.model import context_length, load_pretrained, resolve_dtype
from wikigpt.generation.prompts import encode_prompts, read_prompts

logger = logging.getLogger("wikigpt.generate")


def main() -> None:
    (args,) = parse_args((GenerateArguments,), description=__doc__)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    # a weights-loading bar would sit between the samples and any error line
    hf_logging.disable_progress_bar()
    check_arguments(args)
    prompts = read_prompts(args, sys.stdin)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    model, tokenizer = load_pretrained(
        args.model,
        args.tokenizer_name,
        device=device,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    tokenizer = for_batched_generation(tokenizer)
    settings, from_checkpoint = resolve_settings(args, model.generation_config)
    context = context_length(model.config)
    check_settings(settings, from_checkpoint, context)
    encoded = encode_prompts(tokenizer, prompts, context - settings["max_new_tokens"], context)

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    set_seed(seed)
    record_settings = public_settings(
        settings,
        stop=args.stop,
        seed=seed,
        batch_size=args.batch_size,
        model=args.model,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )
    stream = can_stream(args, prompts, settings)
    several = len(prompts) * settings["num_return_sequences"] > 1
    total_tokens = total_seconds = 0
    with JsonlWriter(args.output_file) if args.output_file else contextlib.nullcontext() as writer:
        if stream and args.echo_prompt:
            print(prompts[0], end="", flush=True)
        for batch in sample(
            model,
            tokenizer,
            prompts,
            encoded,
            settings,
            args.stop,
            args.batch_size,
            stream_to=sys.stdout if stream else None,
        ):
            for record in batch:
                if stream:
                    print(flush=True)  # end the streamed line
                else:
                    if several:
                        print(
                            f"=== prompt {record['prompt_index'] + 1}, sample "
                            f"{record['sample_index'] + 1} ==="
                        )
                    print(
                        (record["prompt"] if args.echo_prompt else "") + record["completion"],
                        flush=True,
                    )
                if writer is not None:
                    writer.write({**record, "settings": record_settings})
            total_tokens += sum(record["new_tokens"] for record in batch)
            total_seconds += batch[0]["seconds"]
    logger.info(
        "%d new tokens in %.2f s: %.1f tokens/s (%s, %s, %d sample%s)",
        total_tokens,
        total_seconds,
        total_tokens / max(total_seconds, 1e-9),
        device,
        record_settings["dtype"],
        len(prompts) * settings["num_return_sequences"],
        "s" if several else "",
    )
    if args.output_file:
        logger.info("wrote %s", args.output_file)


if __name__ == "__main__":
    run_main(main)
