"""Hyper-parameter search: `train.py --hp_search N --hp_space configs/search_spaces/cpu.yaml`.

`Trainer.hyperparameter_search` with the optuna backend (TPE sampler seeded by --seed, no pruning)
runs N trials; each trains what train.py would train with the trial's values (same data, model
builder and callbacks) and is scored by the held-out (validation) perplexity of the model it ends
with: the best checkpoint under early stopping, else the last. Outputs in --output_dir: `trials.csv`
(one row per trial), `best_recipe.yaml` (the run's own config file and flags plus the best values:
`python train.py OUT/best_recipe.yaml` trains the best trial again) and `run-N/`, each trial's
checkpoints and final model.

The search-space file has one entry per key:

    learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    lr_scheduler_type: {type: categorical, choices: [cosine, linear]}
    n_layer: {type: int, low: 2, high: 6}

Keys: any TrainingArguments field (values reach the Trainer through its own `_hp_search_setup`), any
GPT2Config field `--config_overrides` takes (from-scratch models), `dropout` (resid_pdrop,
embd_pdrop and attn_pdrop together), `block_size` (each block size's data is built once, from the
datasets cache) and `train_tokens` (a token budget: max_steps = train_tokens / tokens per step). The
whole file is checked before anything trains.
"""

import dataclasses
import difflib
import enum
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field

import yaml
from transformers import GPT2Config, Trainer

from wikigpt.reliability.checkpoints import WritesIntoCheckpoints
from wikigpt.errors import UsageError
from wikigpt.reliability.nan_guard import TrainingDiverged

logger = logging.getLogger(__name__)

# wikigpt.evaluation.perplexity: exp(summed NLL / tokens) over every held-out block
OBJECTIVE = "eval_perplexity"
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
DATA_KEYS = {"block_size": int}
BUDGET_KEYS = {"train_tokens": int}
SPEC_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}
# Flags that describe the search itself or cannot vary per trial; never searched, never in a recipe.
NOT_SEARCHABLE = {
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "seed",
    "data_seed",
    "do_train",
    "do_eval",
    "do_predict",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "report_to",
    "logging_dir",
    "run_name",
    "deepspeed",
    "fsdp",
    "local_rank",
}
SEARCH_FLAGS = ("hp_search", "hp_space")


@dataclass
class SearchArguments:
    _argument_group_name = "search"  # its title in --help (HfArgumentParser)

    hp_search: int | None = field(
        default=None,
        metadata={
            "help": "Run a hyper-parameter search of this many trials (1 or more) over --hp_space "
            "instead of one training run; writes trials.csv and best_recipe.yaml. Default: off."
        },
    )
    hp_space: str | None = field(
        default=None,
        metadata={
            "help": "With --hp_search: the search-space YAML file, e.g. "
            "configs/search_spaces/cpu.yaml (see docs/tuning.md)."
        },
    )


def model_fields() -> dict:
    """GPT2Config fields `--config_overrides` accepts, with their defaults
    (wikigpt.model.parse_config_overrides)."""
    from wikigpt.model import NOT_OVERRIDABLE

    return {
        k: v
        for k, v in GPT2Config().to_dict().items()
        if k not in NOT_OVERRIDABLE and not k.startswith("_")
    }


@dataclass
class Param:
    """One searched key: where its value goes (training/model/data/budget), how optuna draws it."""

    key: str
    kind: str  # "training", "model", "data", "budget"
    spec: dict

    def suggest(self, trial):
        spec = self.spec
        if spec["type"] == "categorical":
            return trial.suggest_categorical(self.key, spec["choices"])
        suggest = trial.suggest_float if spec["type"] == "float" else trial.suggest_int
        kwargs = {"log": bool(spec.get("log", False))}
        if "step" in spec:
            kwargs["step"] = spec["step"]
        return suggest(self.key, spec["low"], spec["high"], **kwargs)

    def values(self) -> list:
        """Every value an int or categorical entry can take (for checks across keys); [] for a float
        range."""
        spec = self.spec
        if spec["type"] == "categorical":
            return list(spec["choices"])
        if spec["type"] == "int" and not spec.get("log"):
            return list(range(spec["low"], spec["high"] + 1, spec.get("step", 1)))
        if spec["type"] == "int":
            return [spec["low"], spec["high"]]
        return []


class SearchSpace:
    def __init__(self, params: dict[str, Param]):
        self.params = params

    def suggest(self, trial) -> dict:
        """The trial's value of every key (optuna returns the same value if a trial asks twice)."""
        return {key: param.suggest(trial) for key, param in self.params.items()}

    def of_kind(self, values: dict, kind: str) -> dict:
        return {k: v for k, v in values.items() if self.params[k].kind == kind}

    def model_overrides(self, values: dict) -> dict:
        overrides = self.of_kind(values, "model")
        if "dropout" in overrides:
            overrides.update({name: overrides["dropout"] for name in DROPOUT_FIELDS})
            del overrides["dropout"]
        return overrides

    def training_values(self, values: dict, training_args, block_size: int) -> dict:
        """TrainingArguments values of a trial; a token budget becomes max_steps at the trial's
        batch and block size."""
        out = self.of_kind(values, "training")
        if "train_tokens" in values:
            batch = out.get(
                "per_device_train_batch_size", training_args.per_device_train_batch_size
            )
            accumulation = out.get(
                "gradient_accumulation_steps", training_args.gradient_accumulation_steps
            )
            out["max_steps"] = max(
                1,
                math.ceil(
                    values["train_tokens"]
                    / (batch * accumulation * training_args.world_size * block_size)
                ),
            )
        return out


# ---- the search-space file: read and check everything before anything trains ----


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _value_type(key: str, training_args, defaults: dict):
    """(kind, type or Enum class) of a key, or None when the key is unknown."""
    if key == "dropout":
        return "model", float
    if key in defaults:
        default = defaults[key]
        return "model", (type(default) if default is not None else None)
    if key in DATA_KEYS:
        return "data", DATA_KEYS[key]
    if key in BUDGET_KEYS:
        return "budget", BUDGET_KEYS[key]
    names = {f.name for f in dataclasses.fields(training_args) if f.init}
    if key in names and key not in NOT_SEARCHABLE:
        current = getattr(training_args, key)
        if current is None or isinstance(current, (bool, int, float, str, enum.Enum)):
            return "training", (type(current) if current is not None else None)
    return None


def _check_value(where: str, key: str, value, value_type) -> None:
    """One value against the key's type, as the Trainer will cast it (`type(current)(value)`)."""
    if value_type is None:
        if not isinstance(value, (bool, int, float, str)):
            raise UsageError(
                f"{where} choice {value!r} is not a number, string or boolean; fix the entry"
            )
        return
    if issubclass(value_type, enum.Enum):
        allowed = [m.value for m in value_type]
        if value not in allowed:
            raise UsageError(f"{where} choice {value!r} is not one of {allowed}; fix the entry")
    elif value_type is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{where} takes true/false; got {value!r}")
    elif value_type is float:
        if not _number(value):
            raise UsageError(f"{where} takes numbers; got {value!r}")
    elif value_type is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(
                f"{where} takes whole numbers (int); got {value!r}: use type: int or whole choices"
            )
    elif not isinstance(value, value_type):
        raise UsageError(f"{where} takes {value_type.__name__} values; got {value!r}")


def _check_spec(where: str, key: str, spec, value_type) -> dict:
    if not isinstance(spec, dict) or "type" not in spec:
        raise UsageError(
            f"{where} must be a mapping with a type, e.g. "
            f"{key}: {{type: float, low: 0.0, high: 0.2}} "
            f"or {key}: {{type: categorical, choices: [a, b]}}"
        )
    kind = spec["type"]
    if kind not in SPEC_FIELDS:
        raise UsageError(f"{where} has type {kind!r}; use float, int or categorical")
    extra = sorted(set(spec) - SPEC_FIELDS[kind])
    if extra:
        raise UsageError(
            f"{where} (type {kind}) has unknown fields {extra}; it takes "
            f"{sorted(SPEC_FIELDS[kind] - {'type'})}"
        )
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list):
            raise UsageError(f"{where} needs choices: a list, e.g. choices: [a, b]")
        if not choices:
            raise UsageError(f"{where} has empty choices; list at least one value")
        for choice in choices:
            _check_value(where, key, choice, value_type)
        return spec
    for bound in ("low", "high"):
        if bound not in spec:
            raise UsageError(f"{where} needs low and high (type {kind}); add {bound}")
        if not _number(spec[bound]) or (kind == "int" and not isinstance(spec[bound], int)):
            raise UsageError(
                f"{where} {bound} must be {'a whole number' if kind == 'int' else 'a number'}; "
                f"got {spec[bound]!r}"
            )
    if value_type is not None and not issubclass(value_type, (int, float)) or value_type is bool:
        raise UsageError(
            f"{where} takes {value_type.__name__} values: a {kind} range cannot give them; "
            f"use type: categorical with choices"
        )
    if kind == "float" and value_type is int:
        raise UsageError(f"{where} takes whole numbers (int); use type: int")
    low, high = spec["low"], spec["high"]
    if low > high:
        raise UsageError(f"{where} has low {low} above high {high}; swap them")
    if low == high:
        raise UsageError(
            f"{where} has an empty range (low = high = {low}); widen it, or put the fixed value in "
            "the run's config file instead"
        )
    if spec.get("log") and low <= 0:
        raise UsageError(f"{where} has log: true with low {low}; a log range needs low > 0")
    if "log" in spec and not isinstance(spec["log"], bool):
        raise UsageError(f"{where} log must be true or false; got {spec['log']!r}")
    if "step" in spec:
        step = spec["step"]
        if not _number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
            raise UsageError(
                f"{where} step must be a positive {'whole ' if kind == 'int' else ''}number; "
                f"got {step!r}"
            )
        if spec.get("log"):
            raise UsageError(f"{where} takes log or step, not both; drop one")
    return spec


def _read_space_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(
            f"--hp_space {path!r} does not exist; pass a search-space YAML file "
            f"(e.g. configs/search_spaces/cpu.yaml)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            entries = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UsageError(
            f"--hp_space {path!r} could not be read ({str(err).splitlines()[0]}); fix its syntax"
        ) from err
    if not isinstance(entries, dict) or not entries:
        raise UsageError(
            f"--hp_space {path!r} must map each searched key to its range, e.g. "
            f"learning_rate: {{type: float, low: 1.0e-4, high: 1.0e-2, log: true}}"
        )
    return entries


def load_search_space(
    search_args: SearchArguments, model_args, data_args, training_args
) -> SearchSpace:
    """Read and check the whole --hp_space file and the flags around it; every problem is a
    UsageError."""
    if search_args.hp_search is None:
        raise UsageError(
            "--hp_space needs --hp_search N (the number of trials); pass both, or drop --hp_space"
        )
    if search_args.hp_search < 1:
        raise UsageError(
            f"--hp_search must be at least 1 (the number of trials); got {search_args.hp_search}"
        )
    if not search_args.hp_space:
        raise UsageError(
            "--hp_search needs --hp_space FILE, the search space (e.g. "
            "configs/search_spaces/cpu.yaml)"
        )
    if training_args.resume_from_checkpoint:
        raise UsageError(
            "--hp_search starts every trial from scratch; drop --resume_from_checkpoint"
        )
    if training_args.push_to_hub:
        raise UsageError(
            "--hp_search trains many models and pushes none; drop --push_to_hub (push the best "
            "recipe's run instead)"
        )
    path = search_args.hp_space
    entries = _read_space_file(path)
    defaults = model_fields()
    params = {}
    for key, spec in entries.items():
        where = f"--hp_space {path!r}: {key}"
        found = _value_type(str(key), training_args, defaults)
        if found is None:
            known = [
                *defaults,
                "dropout",
                *DATA_KEYS,
                *BUDGET_KEYS,
                *(
                    f.name
                    for f in dataclasses.fields(training_args)
                    if f.init and f.name not in NOT_SEARCHABLE
                ),
            ]
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]}?" if close else "check the spelling"
            raise UsageError(
                f"{where} is not a searchable key (a training argument, a GPT2Config field, "
                f"dropout, block_size or train_tokens); {hint}"
            )
        kind, value_type = found
        params[key] = Param(key, kind, _check_spec(where, key, spec, value_type))
    _check_across_keys(path, params, model_args, training_args, defaults)
    return SearchSpace(params)


def _check_across_keys(path: str, params: dict, model_args, training_args, defaults: dict) -> None:
    where = f"--hp_space {path!r}"
    model_keys = [k for k, p in params.items() if p.kind == "model"]
    if model_keys and model_args.model_name_or_path:
        raise UsageError(
            f"{where}: {model_keys} change the architecture, which only a model built from scratch "
            "can take; drop them, or drop --model_name_or_path"
        )
    if "dropout" in params and set(DROPOUT_FIELDS) & set(params):
        raise UsageError(
            f"{where}: dropout sets {', '.join(DROPOUT_FIELDS)} together; search either dropout or "
            f"those fields, not both"
        )
    if "lr_scheduler_type" in params and training_args.lr_scheduler_kwargs:
        raise UsageError(
            f"{where}: lr_scheduler_kwargs {training_args.lr_scheduler_kwargs} belong to one "
            "schedule, but lr_scheduler_type is searched; drop lr_scheduler_type from the search "
            "space, or drop --lr_scheduler_kwargs"
        )
    if "train_tokens" in params and {"max_steps", "num_train_epochs"} & set(params):
        raise UsageError(
            f"{where}: train_tokens sets max_steps from a token budget; drop max_steps and "
            f"num_train_epochs from the search space"
        )
    if params.get("dropout") and any(v < 0 or v >= 1 for v in _bounds(params["dropout"])):
        raise UsageError(f"{where}: dropout is a probability; keep its values in [0, 1)")
    from wikigpt.model import DEFAULT_PRESET, PRESETS, parse_config_overrides

    base = dict(PRESETS.get(model_args.preset or DEFAULT_PRESET, {}))
    if model_args.config_overrides:
        base.update(parse_config_overrides(model_args.config_overrides))
    base = {**defaults, **base}

    def candidates(key):
        if key in params:
            return params[key].values() or _bounds(params[key])
        return [base[key]]

    if not model_args.model_name_or_path and ("n_embd" in params or "n_head" in params):
        bad = [(e, h) for e in candidates("n_embd") for h in candidates("n_head") if e % h]
        if bad:
            raise UsageError(
                f"{where}: n_embd must be divisible by n_head, but n_embd {bad[0][0]} with n_head "
                f"{bad[0][1]} is not; search n_embd as categorical choices (or with a step) that "
                "every n_head divides"
            )
    if "block_size" in params:
        if any(b < 1 for b in _bounds(params["block_size"])):
            raise UsageError(f"{where}: block_size values must be at least 1")
        if not model_args.model_name_or_path:
            context = min(candidates("n_positions"))
            if max(_bounds(params["block_size"])) > context:
                raise UsageError(
                    f"{where}: block_size reaches {max(_bounds(params['block_size']))}, more than "
                    f"the model's n_positions ({context}); keep block_size at or below {context}"
                )
    if "train_tokens" in params and min(_bounds(params["train_tokens"])) < 1:
        raise UsageError(f"{where}: train_tokens must be at least 1")


def _bounds(param: Param) -> list:
    spec = param.spec
    return list(spec["choices"]) if spec["type"] == "categorical" else [spec["low"], spec["high"]]


# ---- the search: one Trainer whose model_init builds each trial as train.py builds a run ----


def searching(search_args: SearchArguments) -> bool:
    return search_args.hp_search is not None or search_args.hp_space is not None


class SearchTrainer(Trainer):
    """Trainer for `hyperparameter_search` whose `model_init` is wikigpt.train.run.build_run with
    the trial's values.

    Each trial takes the built run's model, datasets and its Trainer's callback handler, so it
    trains with exactly train.py's data, model builder and callbacks, fresh for every trial (some
    callbacks keep state across `train()` calls, e.g. EarlyStoppingCallback's patience counter, and
    block size changes the data; the Trainer reads both after `model_init`). The objective is the
    held-out perplexity of the model a trial ends with, evaluated once after training: the Trainer's
    own is the last evaluation during training, not the best checkpoint that early stopping loads at
    the end.
    """

    def __init__(self, *, space: SearchSpace, build_trial, base_run, n_trials: int, **kwargs):
        self.space, self.build_trial, self.base_run, self.n_trials = (
            space,
            build_trial,
            base_run,
            n_trials,
        )
        self.run = base_run
        super().__init__(model_init=self.init_trial, **kwargs)

    def init_trial(self, trial=None):
        if trial is None:  # Trainer.__init__ asks for a model before any trial: the run as given
            return self.base_run.model
        self.run = self.build_trial(trial.number, self.space.suggest(trial))
        self.callback_handler = self.run.trainer.callback_handler
        for callback in (
            self.callback_handler.callbacks
        ):  # the trial's checkpoints go to run-N/, not --output_dir
            if isinstance(callback, WritesIntoCheckpoints):
                callback.run_dir = self._get_output_dir(trial)
        self.train_dataset, self.eval_dataset = (
            self.run.trainer.train_dataset,
            self.run.trainer.eval_dataset,
        )
        return self.run.model

    def trial_training_values(self, trial) -> dict:
        """`hp_space` for the Trainer: the values it sets on TrainingArguments (token budget ->
        max_steps)."""
        return self.space.training_values(self.space.suggest(trial), self.args, self.run.block_size)

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        if trial is None or self.hp_search_backend is None:
            return super().train(
                resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs
            )
        start = time.perf_counter()
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        run = self.run
        if run.preemption.signum is not None:
            print(
                f"wikigpt: search stopped by a signal during trial {trial.number}; no trials.csv "
                "or best_recipe.yaml written, rerun the command",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(run.preemption.exit_code)
        try:
            run.nan_guard.raise_if_diverged(self.args)
        except (
            TrainingDiverged
        ) as err:  # a failed trial, not a failed search: optuna records it (catch=)
            if self.is_world_process_zero():
                print(
                    f"trial {trial.number} ({trial.number + 1}/{self.n_trials}): {_params(trial)} "
                    "-> diverged (loss or weights not finite); the search goes on",
                    flush=True,
                )
            raise err
        metrics = self.evaluate()
        self.objective = metrics[OBJECTIVE]
        seconds = time.perf_counter() - start
        self.save_model(
            self._get_output_dir(trial)
        )  # run-N/: the trial's final model, loadable by eval.py
        for key, value in {
            "seconds": round(seconds, 2),
            "block_size": run.block_size,
            "train_steps": output.global_step,
            "tokens_trained": output.global_step * run.tokens_per_step,
            "eval_token_loss": metrics.get("eval_token_loss"),
            "eval_tokens": metrics.get("eval_tokens"),
        }.items():
            trial.set_user_attr(key, value)
        if self.is_world_process_zero():
            print(progress_line(trial, self.objective, seconds, self.n_trials), flush=True)
        return output


def _params(trial) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
    )


def progress_line(trial, objective: float, seconds: float, n_trials: int) -> str:
    import optuna

    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best_number, best = min(
        [(t.number, t.value) for t in done] + [(trial.number, objective)], key=lambda x: x[1]
    )
    return (
        f"trial {trial.number} ({trial.number + 1}/{n_trials}): {_params(trial)} -> held-out "
        f"perplexity {objective:.2f} (best {best:.2f}, trial {best_number}); {seconds:.1f} s"
    )


def run_search(trainer: SearchTrainer, seed: int):
    """Run the trials; returns the optuna study (every trial, for the table and the recipe)."""
    import optuna

    storage = (
        optuna.storages.InMemoryStorage()
    )  # kept here so every trial can be read back after the search
    optuna.logging.set_verbosity(
        optuna.logging.WARNING
    )  # SearchTrainer prints one line per trial instead
    trainer.hyperparameter_search(
        hp_space=trainer.trial_training_values,
        compute_objective=lambda metrics: metrics[OBJECTIVE],
        n_trials=trainer.n_trials,
        direction="minimize",
        backend="optuna",
        storage=storage,
        study_name="wikigpt",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.NopPruner(),
        catch=(TrainingDiverged,),
    )
    return optuna.load_study(study_name="wikigpt", storage=storage)


# ---- outputs: the trials table and the best trial as a recipe ----


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.trials:
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "held_out_perplexity": t.value,
                "seconds": t.user_attrs.get("seconds"),
                **t.params,
                **{k: v for k, v in t.user_attrs.items() if k != "seconds"},
                "run_dir": f"run-{t.number}",
            }
        )
    return rows


def write_trials_table(study, path: str) -> None:
    import pandas as pd

    pd.DataFrame(trial_rows(study)).to_csv(path, index=False)


def yaml_value(value):
    """A parsed argument as the YAML a config file holds (enums by value, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [yaml_value(v) for v in value]
    if isinstance(value, dict):
        return {k: yaml_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def given_settings(argv: list[str], parsed: tuple) -> dict:
    """The settings a run was started with: its config files' keys, then the flags on its command
    line (under their current names: an old name in OLD_NAMES is recorded under its new one)."""
    from wikigpt.cli import CONFIG_EXTENSIONS, OLD_NAMES, _read_config

    settings = {}
    for path in argv:
        if not path.endswith(CONFIG_EXTENSIONS) or path.startswith("-"):
            break
        settings.update(_read_config(path))
    names = {f.name: obj for obj in parsed for f in dataclasses.fields(obj)}
    for arg in argv:
        name = arg[2:].split("=")[0] if arg.startswith("--") else None
        name = OLD_NAMES.get(name.replace("-", "_"), name) if name else None
        if name and name.startswith("no_") and name[3:] in names:
            name = name[3:]
        if name in names:
            settings[name] = yaml_value(getattr(names[name], name))
    for key in SEARCH_FLAGS:
        settings.pop(key, None)
    return settings


def best_recipe(
    settings: dict, space: SearchSpace, trial, training_args, model_args, output_dir: str
) -> dict:
    """The run's settings with the best trial's values in place: what `train.py RECIPE` needs to
    train it again."""
    values = dict(trial.params)
    recipe = dict(settings)
    block_size = trial.user_attrs["block_size"]
    for key, value in space.training_values(values, training_args, block_size).items():
        recipe[key] = yaml_value(value)
    if "block_size" in values:
        recipe["block_size"] = values["block_size"]
    if space.model_overrides(values):
        recipe["config_overrides"] = config_overrides_text(
            model_args.config_overrides, space.model_overrides(values)
        )
    recipe["output_dir"] = os.path.join(output_dir, "best")
    return recipe


def write_best_recipe(path: str, recipe: dict, trial, n_trials: int, command: str) -> None:
    header = (
        f"# Best of {n_trials} trials: trial {trial.number} (run-{trial.number}), "
        f"held-out perplexity {trial.value:.4f}.\n"
        f"# Search: {command}\n"
        f"# Train it again: python train.py {path}\n"
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(recipe, sort_keys=False))


def config_overrides_text(base: str | None, overrides: dict) -> str | None:
    """--config_overrides with the trial's model values on top of the run's own."""
    from wikigpt.model import parse_config_overrides

    if not overrides:
        return base
    merged = {**parse_config_overrides(base or ""), **overrides}
    return ",".join(f"{k}={v}" for k, v in merged.items())


def trial_arguments(
    space: SearchSpace,
    values: dict,
    model_args,
    data_args,
    lever_args,
    calibration_args,
    training_args,
    base_block_size: int,
    run_dir: str,
):
    """The run arguments of one trial (RUN_ARGUMENTS' objects): the search's own with the trial's
    values in place."""
    block_size = values.get("block_size", base_block_size)
    trial_model_args = dataclasses.replace(
        model_args,
        config_overrides=config_overrides_text(
            model_args.config_overrides, space.model_overrides(values)
        ),
    )
    trial_data_args = dataclasses.replace(
        data_args, block_size=values.get("block_size", data_args.block_size)
    )
    trial_training_args = dataclasses.replace(
        training_args,
        **space.training_values(values, training_args, block_size),
        output_dir=run_dir,
        overwrite_output_dir=True,
    )
    return trial_model_args, trial_data_args, lever_args, calibration_args, trial_training_args


def tune(
    argv: list[str], model_args, data_args, lever_args, calibration_args, training_args, search_args
) -> dict:
    """train.py --hp_search: check the space and the run, run the trials, write trials.csv and
    best_recipe.yaml.

    Takes RUN_ARGUMENTS' objects in their order, then SearchArguments."""
    from wikigpt.train.run import build_run

    space = load_search_space(search_args, model_args, data_args, training_args)
    settings = given_settings(
        argv, (model_args, data_args, lever_args, calibration_args, training_args, search_args)
    )
    pristine = dataclasses.replace(
        training_args
    )  # the Trainer sets each trial's values on training_args itself
    # every check of train.py, before anything trains
    base = build_run(model_args, data_args, lever_args, calibration_args, training_args)

    def build_trial(number: int, values: dict):
        run_dir = os.path.join(training_args.output_dir, f"run-{number}")
        return build_run(
            *trial_arguments(
                space,
                values,
                model_args,
                data_args,
                lever_args,
                calibration_args,
                pristine,
                base.block_size,
                run_dir,
            )
        )

    trainer = SearchTrainer(
        space=space,
        build_trial=build_trial,
        base_run=base,
        n_trials=search_args.hp_search,
        args=training_args,
        train_dataset=base.trainer.train_dataset,
        eval_dataset=base.trainer.eval_dataset,
        processing_class=base.trainer.processing_class,
        data_collator=base.trainer.data_collator,
        compute_metrics=base.trainer.compute_metrics,
        preprocess_logits_for_metrics=base.trainer.preprocess_logits_for_metrics,
    )
    study = run_search(trainer, training_args.seed)
    if not trainer.is_world_process_zero():
        return {}
    summary = write_search_outputs(study, space, settings, argv, model_args, pristine)
    logger.info(
        "search done: best trial %d, held-out perplexity %.4f; trials in %s, its recipe in %s",
        summary["best_trial"],
        summary["best_held_out_perplexity"],
        summary["trials"],
        summary["best_recipe"],
    )
    return summary


def write_search_outputs(
    study, space: SearchSpace, settings: dict, argv: list[str], model_args, training_args
) -> dict:
    """trials.csv and best_recipe.yaml in --output_dir; returns their paths and the best trial."""
    out = training_args.output_dir
    table, recipe_path = os.path.join(out, "trials.csv"), os.path.join(out, "best_recipe.yaml")
    write_trials_table(study, table)
    import optuna

    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise TrainingDiverged(
            f"every one of the {len(study.trials)} trials diverged (see {table}); lower the "
            f"learning_rate range in --hp_space, or raise warmup_steps"
        )
    best = study.best_trial
    recipe = best_recipe(settings, space, best, training_args, model_args, out)
    command = " ".join(["python train.py", *argv])
    write_best_recipe(recipe_path, recipe, best, len(study.trials), command)
    return {
        "trials": table,
        "best_recipe": recipe_path,
        "best_trial": best.number,
        "best_held_out_perplexity": best.value,
        "best_params": best.params,
    }
