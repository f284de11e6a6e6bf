"""User-facing errors: one line that names the argument and the fix, a non-zero exit, no traceback.

Every check of user input raises `UsageError`; the scripts wrap `main` in `run_main`, which prints
`error: <message>` to stderr and exits 2. `--debug` (or WIKIGPT_DEBUG=1) re-raises for the full
traceback.
"""

import contextlib
import os
import sys


class UsageError(Exception):
    """Bad input from the user. The message must name the argument and say how to fix it."""


EXIT_USAGE = 2


def run_main(main) -> None:
    debug = "--debug" in sys.argv or os.environ.get("WIKIGPT_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        main()
    except UsageError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", EXIT_USAGE))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def loading(flag: str, value: str, local_hint: str):
    """Turn a failed Hub/local load into one line naming `flag` and the local-path alternative.

    Without network, `from_pretrained("gpt2")` or `load_dataset("wikitext")` raise long, nested
    errors; users need to know which flag to point at a local copy instead.
    """
    try:
        yield
    except UsageError:
        raise
    except Exception as err:  # noqa: BLE001 - any load failure becomes a usage error
        if os.path.exists(value):
            raise UsageError(
                f"{flag} {value!r} exists but could not be loaded ({_first_line(err)}); "
                f"check that it is complete, or pass another path to {flag}"
            ) from err
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = (
            "HF_HUB_OFFLINE=1 is set"
            if offline
            else "the Hugging Face Hub is unreachable or has no such repo"
        )
        raise UsageError(
            f"{flag} {value!r} is not a local path and could not be fetched ({why}: "
            f"{_first_line(err)}); {local_hint}"
        ) from err
