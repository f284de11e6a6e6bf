"""`train.py --help` reads as a table of contents: one group per argument dataclass, in the order of
a run."""

from conftest import run_script

GROUPS = [
    "model",
    "data",
    "levers for small data",
    "calibration after training",
    "training",
    "search",
]


def test_train_help_lists_the_flags_in_groups():
    done = run_script("train.py", "--help", timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    titles = [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert [t for t in titles if t != "options"] == GROUPS
    starts = {title: lines.index(f"{title}:") for title in GROUPS}

    def group_of(flag: str) -> str:
        at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(f"{flag} "))
        return max((start, title) for title, start in starts.items() if start < at)[1]

    assert group_of("--preset") == "model"
    assert group_of("--block_size") == "data"
    assert group_of("--rare_tokens_below") == "levers for small data"
    assert group_of("--distill_from") == "levers for small data"
    assert group_of("--calibrate_temperature") == "calibration after training"
    assert group_of("--learning_rate") == "training"
    assert group_of("--hp_search") == "search"
    assert (
        "--tie_tokens_below" not in done.stdout
    )  # the old name parses, but --help names the new one
