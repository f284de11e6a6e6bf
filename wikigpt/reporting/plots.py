"""Training curves and tracking: a PNG of loss, validation perplexity and learning rate against
steps and tokens (from Trainer's log_history), and a check that the --report_to trackers are
installed."""

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
from transformers.integrations import is_tensorboard_available

from wikigpt.errors import UsageError


def check_report_to(training_args) -> None:
    """Fail before any work when --report_to names a tracker whose package is missing (Trainer would
    fail later)."""
    report_to = training_args.report_to or []
    report_to = [report_to] if isinstance(report_to, str) else report_to
    if "tensorboard" in report_to and not is_tensorboard_available():
        raise UsageError(
            "--report_to tensorboard needs the tensorboard package, which is not installed; "
            "run `pip install tensorboard`, or drop --report_to tensorboard"
        )


def _series(log_history: list[dict], key: str) -> tuple[list, list]:
    # One point per step, the last logged (the final evaluation often repeats the last in-training
    # one).
    points = {e["step"]: e[key] for e in log_history if e.get(key) is not None and "step" in e}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _perplexity_series(log_history: list[dict], prefix: str) -> tuple[list, list]:
    steps, values = _series(log_history, f"{prefix}_perplexity")
    if steps:
        return steps, values
    steps, losses = _series(log_history, f"{prefix}_loss")
    return steps, [math.exp(min(v, 700)) for v in losses]


def plot_training_curves(
    log_history: list[dict], path: str, tokens_per_step: int | None = None, title: str | None = None
) -> str:
    """Save a PNG with three panels sharing the step axis (tokens on the top axis when
    tokens_per_step is given)."""
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(8, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_ppl, ax_lr = fig.subplots(3, 1, sharex=True)

    steps, loss = _series(log_history, "loss")
    ax_loss.plot(steps, loss, marker=".", label="training loss")
    ax_loss.set_ylabel("loss (nats/token)")

    v_steps, v_ppl = _perplexity_series(log_history, "eval")
    t_steps, t_ppl = _perplexity_series(log_history, "test")
    if v_steps:
        ax_ppl.plot(v_steps, v_ppl, marker="o", color="tab:orange", label="validation")
        ax_ppl.annotate(
            f"{v_ppl[-1]:.1f}", (v_steps[-1], v_ppl[-1]), textcoords="offset points", xytext=(4, 4)
        )
    if t_steps:
        ax_ppl.plot(t_steps, t_ppl, marker="s", linestyle="none", color="tab:green", label="test")
    if v_steps or t_steps:
        values = v_ppl + t_ppl
        if max(values) > 10 * min(values):  # from-scratch runs fall from ~50,000 to tens: log scale
            ax_ppl.set_yscale("log")
            ax_ppl.yaxis.set_minor_formatter(NullFormatter())
        ax_ppl.yaxis.set_major_formatter(
            FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
        )
        ax_ppl.legend()
    else:
        ax_ppl.text(
            0.5, 0.5, "no evaluation logged", ha="center", va="center", transform=ax_ppl.transAxes
        )
    ax_ppl.set_ylabel("perplexity (token-level)")

    lr_steps, lr = _series(log_history, "learning_rate")
    ax_lr.plot(lr_steps, lr, color="tab:purple")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    for ax in (ax_loss, ax_ppl, ax_lr):
        ax.grid(True, alpha=0.3)

    if tokens_per_step:
        top = ax_loss.secondary_xaxis(
            "top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step)
        )
        top.set_xlabel(f"training tokens ({tokens_per_step:,} per step)")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path
