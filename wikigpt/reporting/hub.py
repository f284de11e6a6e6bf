"""Publishing to the Hub with Trainer.push_to_hub, once, after the model, results and card are saved
locally.

Trainer creates the Hub repo in its __init__ when --push_to_hub is set, so without network (or
without a token) a run would die before training, and a push that fails at the end must not cost the
run. So the run trains with push_to_hub off, saves everything, and only then pushes; a failed push
is one `error:` line that says where the files are and how to upload them later.
"""

import logging
import os

from huggingface_hub import upload_folder
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from wikigpt.reliability.checkpoints import SET_ASIDE_PREFIXES
from wikigpt.errors import UsageError

logger = logging.getLogger(__name__)


def defer_push(training_args) -> bool:
    """Turn push_to_hub off for the Trainer (no repo creation at init, no pushes mid-run); return
    whether it was on."""
    wanted = bool(training_args.push_to_hub)
    if (
        wanted
        and str(getattr(training_args.hub_strategy, "value", training_args.hub_strategy)) != "end"
    ):
        logger.warning(
            "--hub_strategy %s: wikigpt pushes once, after the local save at the end of training; "
            "checkpoints are not pushed during the run",
            training_args.hub_strategy,
        )
    training_args.push_to_hub = False
    return wanted


def hub_repo_name(training_args) -> str:
    return training_args.hub_model_id or os.path.basename(os.path.abspath(training_args.output_dir))


# What Trainer.push_to_hub leaves out of the upload (hard-coded there in transformers 5.24: "_*" and
# checkpoints), plus the folders wikigpt sets aside (corrupt-checkpoint-N,
# previous-run-checkpoint-N: pickles of runs or saves that are not this model).
UPLOAD_IGNORE_PATTERNS = (
    "_*",
    f"{PREFIX_CHECKPOINT_DIR}-*",
    *(f"{prefix}*" for prefix in SET_ASIDE_PREFIXES),
)


def push_after_local_save(
    trainer, commit_message: str = "wikigpt: model, results.json, model card"
) -> None:
    """Upload output_dir (model, tokenizer, results.json, README.md card, plot), as
    Trainer.push_to_hub does but with UPLOAD_IGNORE_PATTERNS (Trainer.push_to_hub takes no
    patterns). The model is already saved (train.py), so only the main process has work to do:
    create the repo, upload the folder.
    """
    if not trainer.is_world_process_zero():
        return
    args = trainer.args
    repo = hub_repo_name(args)
    try:
        trainer.init_hf_repo(token=args.hub_token, private=args.hub_private_repo)
        upload_folder(
            repo_id=trainer.hub_model_id,
            folder_path=args.output_dir,
            commit_message=commit_message,
            token=args.hub_token,
            revision=args.hub_revision,
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        )  # a copy: upload_folder appends to it
    except Exception as err:  # noqa: BLE001 - offline, no token, no rights: all end the same way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        exclude = " ".join(f"--exclude '{pattern}'" for pattern in UPLOAD_IGNORE_PATTERNS)
        raise UsageError(
            f"--push_to_hub could not upload to the Hub repo {repo!r} ({type(err).__name__}: "
            f"{reason}); nothing is lost: the model, results.json and README.md are saved in "
            f"{args.output_dir!r}. Upload them later with `hf upload {repo} {args.output_dir} "
            f"{exclude}` (check network access, `hf auth login` and --hub_model_id)"
        ) from err
    logger.info("pushed %s to the Hub repo %s", args.output_dir, trainer.hub_model_id or repo)
