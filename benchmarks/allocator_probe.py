"""CPU training steps under different memory allocator settings: glibc as it comes, with torch's
huge pages, with wikigpt's keep-freed-memory setting (wikigpt/train/cpu_memory.py, train.py's
default), and tcmalloc.

    python benchmarks/allocator_probe.py --output_json benchmarks/results/cpu_allocators.json

Each setting runs in its own process (an allocator is chosen when the process starts), in turn,
`--rounds` times: the CPU recipe's model (8 x 128, vocabulary 50,257) at 4 x 256 tokens, forward +
backward + AdamW, `--steps` timed steps after 2 warm-up steps. Prints tokens/s, system time and
minor page faults per setting and round.
"""

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TCMALLOC = "/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
OFF = {"WIKIGPT_KEEP_FREED_MEMORY": "0"}
SETTINGS = {
    "glibc": {**OFF, "THP_MEM_ALLOC_ENABLE": "0"},
    "glibc+thp": {**OFF, "THP_MEM_ALLOC_ENABLE": "1"},
    "glibc+keep": {"THP_MEM_ALLOC_ENABLE": "0"},
    "glibc+keep+thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "tcmalloc": {**OFF, "THP_MEM_ALLOC_ENABLE": "0", "LD_PRELOAD": TCMALLOC},
}


@dataclass
class ProbeArguments:
    rounds: int = field(default=2, metadata={"help": "Times each setting runs, in turn."})
    steps: int = field(default=5, metadata={"help": "Timed steps per run."})
    output_json: str | None = field(default=None, metadata={"help": "Also write the results here."})


def one_run(steps: int) -> dict:
    """Runs in the child process: time `steps` training steps, return tokens/s, system time and page
    faults."""
    from wikigpt.train.cpu_memory import keep_freed_memory

    keep_freed_memory()  # as train.py does; WIKIGPT_KEEP_FREED_MEMORY=0 turns it off
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=8, n_head=4, n_embd=128, n_positions=256, vocab_size=50257)
    )
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    batch = torch.randint(0, 50257, (4, 256))

    def step():
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(2):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        step()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "tokens_per_second": round(batch.numel() * steps / seconds, 1),
        "system_seconds": round(after.ru_stime - before.ru_stime, 2),
        "minor_page_faults": after.ru_minflt - before.ru_minflt,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(one_run(int(sys.argv[2]))))
        return
    from transformers import HfArgumentParser

    from wikigpt.atomic_json import write_json_atomic

    (args,) = HfArgumentParser(ProbeArguments).parse_args_into_dataclasses()
    if not os.path.exists(TCMALLOC):
        sys.exit(f"error: {TCMALLOC} not found; install it (apt-get install libtcmalloc-minimal4)")
    results = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(args.steps)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, results[name][-1], flush=True)
    if args.output_json:
        write_json_atomic(
            args.output_json,
            {"threads": os.cpu_count(), "steps": args.steps, "batch": [4, 256], "results": results},
        )


if __name__ == "__main__":
    main()
