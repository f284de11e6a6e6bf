"""A web page to try a checkpoint: sample with generate.py's settings, and see how the model was
trained.

    pip install -r requirements-app.txt
    python app.py --model out/quickstart   # any train.py --output_dir, checkpoint folder or Hub id
    # then open http://127.0.0.1:7860

Listens on 127.0.0.1 only and never makes a public share link. The same file runs as a Hugging Face
Space (docs/demo.md): there the model comes from the WIKIGPT_MODEL variable and the host from
GRADIO_SERVER_NAME.
"""

import logging
import os
import sys
import threading
from dataclasses import dataclass, field

os.environ.setdefault(
    "GRADIO_ANALYTICS_ENABLED", "False"
)  # before gradio is imported: no usage reports

from wikigpt.cli import parse_args  # noqa: E402
from wikigpt.reporting.demo import (
    CAN_AND_CANNOT,
    EXAMPLES,
    DemoModel,
    Request,
    generate,  # noqa: E402
    load_demo_model,
    model_facts,
)
from wikigpt.errors import UsageError, run_main  # noqa: E402

INSTALL_HINT = "the web demo needs gradio; install it with: pip install -r requirements-app.txt"


@dataclass
class AppArguments:
    model: str = field(
        default=os.environ.get("WIKIGPT_MODEL", "out/quickstart"),
        metadata={
            "help": "Checkpoint to show: a train.py --output_dir (its results.json, model card and "
            "curves fill the 'How it was trained' tab), a checkpoint folder or a Hub id. "
            "Default: $WIKIGPT_MODEL, else out/quickstart."
        },
    )
    host: str = field(
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        metadata={
            "help": "Address to listen on. 127.0.0.1 (default) is this computer only; 0.0.0.0 is "
            "every network interface (a Space sets GRADIO_SERVER_NAME=0.0.0.0)."
        },
    )
    port: int = field(
        default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), metadata={"help": "Port."}
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps."}
    )
    dtype: str = field(default="auto", metadata={"help": "auto, float32, bfloat16 or float16."})
    allow_pickle: bool = field(
        default=False,
        metadata={
            "help": "Allow pickle weights (pytorch_model.bin); they can run code when loaded."
        },
    )


def import_gradio():
    try:
        import gradio
    except ImportError as err:
        raise UsageError(INSTALL_HINT) from err
    return gradio


def build_page(demo: DemoModel):
    gr = import_gradio()
    facts, curves, card = model_facts(demo)
    defaults = demo.defaults or {
        "do_sample": True,
        "max_new_tokens": 100,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
    }
    cancels: dict[
        str, threading.Event
    ] = {}  # one per visitor: their Stop button ends their generation

    def run(
        prompt,
        decoding,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        repetition_penalty,
        seed,
        stop,
        request: gr.Request,
    ):
        cancel = cancels[request.session_hash] = threading.Event()
        yield "", ""  # clear the last result at once
        yield from generate(
            demo,
            Request(
                prompt,
                decoding == "greedy",
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
                stop,
            ),
            cancel,
        )

    def stop_generation(request: gr.Request):
        if (cancel := cancels.get(request.session_hash)) is not None:
            cancel.set()

    with gr.Blocks(title=f"wikigpt: {demo.name}") as page:
        gr.Markdown(
            f"# wikigpt demo: `{demo.name}`\nType a prompt (or pick an example below) and press "
            "**Generate**: the model writes what it thinks comes next, token by token. The second "
            "tab shows how the model was trained and how well it does."
        )
        if demo.error:
            gr.Markdown(f"**error:** {demo.error}", elem_id="load-error")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(
                        label="Prompt",
                        lines=5,
                        elem_id="prompt",
                        placeholder="Leave empty for an unconditional sample",
                    )
                    with gr.Row():
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop_button = gr.Button("Stop", elem_id="stop")
                    output = gr.Textbox(
                        label="Prompt + generated text",
                        lines=12,
                        elem_id="output",
                        interactive=False,
                    )
                    status = gr.Markdown(elem_id="status")
                with gr.Column(scale=2):
                    decoding = gr.Radio(
                        ["sampling", "greedy"],
                        label="Decoding",
                        elem_id="decoding",
                        value="sampling" if defaults["do_sample"] else "greedy",
                        info="greedy: always the likeliest token (same text every time)",
                    )
                    max_new_tokens = gr.Number(
                        defaults["max_new_tokens"],
                        label="Max new tokens",
                        precision=0,
                        elem_id="max_new_tokens",
                        info=f"context: {demo.context or 'n/a'} tokens, prompt included",
                    )
                    seed = gr.Textbox(
                        "",
                        label="Seed",
                        elem_id="seed",
                        placeholder="empty: a fresh one each time",
                        info="same seed + settings = same text as generate.py --seed",
                    )
                    temperature = gr.Slider(
                        0,
                        2,
                        defaults["temperature"],
                        step=0.05,
                        label="Temperature",
                        info="sampling: < 1 safer, > 1 wilder",
                        elem_id="temperature",
                    )
                    top_k = gr.Number(
                        defaults["top_k"],
                        label="Top-k",
                        precision=0,
                        elem_id="top_k",
                        info="sample from the k likeliest tokens (0 = all)",
                    )
                    top_p = gr.Slider(
                        0,
                        1,
                        defaults["top_p"],
                        step=0.01,
                        label="Top-p",
                        elem_id="top_p",
                        info="nucleus sampling mass (1 = off)",
                    )
                    repetition_penalty = gr.Slider(
                        0.5,
                        2,
                        defaults["repetition_penalty"],
                        step=0.05,
                        label="Repetition penalty",
                        elem_id="repetition_penalty",
                        info="> 1 discourages repeats (1 = off)",
                    )
                    stop = gr.Textbox(
                        label="Stop string",
                        elem_id="stop_string",
                        info=r"end the text there, e.g. \n for the end of the line",
                    )
            gr.Examples(
                [example[:2] for example in EXAMPLES],
                inputs=[prompt, stop],
                label="Example prompts",
                example_labels=[example[2] for example in EXAMPLES],
            )
            gr.Markdown(f"**What to expect.** {CAN_AND_CANNOT}")
        with gr.Tab("How it was trained", elem_id="facts-tab"):
            gr.Markdown(facts, elem_id="facts")
            if curves:
                gr.Image(
                    curves,
                    label="Training curves",
                    show_label=True,
                    interactive=False,
                    elem_id="curves",
                )
            if card:
                with gr.Accordion("Model card (README.md)", open=False):
                    gr.Markdown(card)

        # One generation at a time across the page: torch's random generator is global, so two at
        # once would make a seed's text depend on the other visitor. trigger_mode="once": a second
        # click waits its turn.
        event = go.click(
            run,
            [
                prompt,
                decoding,
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
                stop,
            ],
            [output, status],
            concurrency_limit=1,
            trigger_mode="once",
        )
        stop_button.click(stop_generation, None, None, queue=False)
        stop_button.click(None, None, None, cancels=[event])
    return page, gr


def main() -> None:
    (args,) = parse_args((AppArguments,), description=__doc__)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("wikigpt").setLevel(logging.INFO)
    import_gradio()  # fail here, in one line, before minutes of loading
    demo = load_demo_model(args.model, args.device, args.dtype, args.allow_pickle)
    if demo.error:  # the page opens anyway and says the same
        print(f"error: {demo.error}", file=sys.stderr)
    page, gr = build_page(demo)
    theme = gr.themes.Default(
        font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    page.queue().launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        theme=theme,
        footer_links=["gradio"],
    )


if __name__ == "__main__":
    run_main(main)
