"""wikigpt/train/cpu_memory.py: with keep_freed_memory() a process reuses freed large blocks instead
of faulting in fresh pages; WIKIGPT_KEEP_FREED_MEMORY=0 leaves glibc as it comes. Each case runs in
a fresh interpreter."""

import json
import os
import subprocess
import sys

from conftest import REPO

CHILD = """
import json, resource, sys
import numpy as np
from wikigpt.train.cpu_memory import keep_freed_memory
took = keep_freed_memory()
faults = []
for _ in range(4):  # a 64 MB block written and freed, as a training step's logits are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = np.ones(8 << 20)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""


def run_child(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WIKIGPT_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["WIKIGPT_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    kept, default = run_child(None), run_child("0")
    assert kept["took"] is True and default["took"] is False
    # glibc maps every new block afresh and faults it in (~540 faults with transparent huge pages,
    # ~16,000 without)
    assert all(f > 100 for f in default["faults"])
    assert all(
        f < 10 for f in kept["faults"][1:]
    )  # after the first, the freed block is reused as it is
