"""Test helper: run train.py, but pause before optimizer step STEP+1 until MARKER_DIR/go exists.

    python tests/pause_train.py STEP MARKER_DIR train.py-args...

It writes MARKER_DIR/paused when it stops, so a test can signal (SIGKILL, SIGTERM) a run that is
known to be mid-training with checkpoints 1..STEP on disk: timing-free, unlike sleeping and hoping.
"""

import runpy
import sys
import time
from pathlib import Path

import transformers

REPO = Path(__file__).resolve().parent.parent
step, marker_dir, argv = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
original_training_step = transformers.Trainer.training_step


def paused_training_step(self, *args, **kwargs):
    if self.state.global_step == step and not (marker_dir / "paused").exists():
        (marker_dir / "paused").touch()
        deadline = time.time() + 300
        while not (marker_dir / "go").exists() and time.time() < deadline:
            time.sleep(0.05)
    return original_training_step(self, *args, **kwargs)


transformers.Trainer.training_step = paused_training_step
sys.argv = [str(REPO / "train.py"), *argv]
sys.path.insert(0, str(REPO))
runpy.run_path(str(REPO / "train.py"), run_name="__main__")
