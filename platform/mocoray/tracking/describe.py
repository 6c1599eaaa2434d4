"""What each run says about itself in the MLflow UI: its Source (job + recipe), its description, transfer results.

The runs table shows `mlflow.source.name` as its last path segment, so a run's source is short and
slash-free: `mocoray <job> <recipe file name>` (a sweep's trial: `mocoray sweep <recipe> trial <id>`);
the full command line stays the run's `command.txt` artifact. `mlflow.note.content` is the run's
description (markdown), rebuilt from what the store holds whenever the run ends or another run links to
it: what it is, its headline result, and the ids of the runs it is linked to. The headline metrics of a
linear or detection run are also logged on its pretraining run as `transfer.<metric>`, so the runs table
and the compare charts put K, m, tau beside them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..table import render_table
from .client import (
    JOB_TAG,
    MLFLOW_PARENT_TAG,
    PRETRAIN_RUN_TAG,
    STATUS_TAG,
    SWEEP_RUN_TAG,
    client,
    last_logged_step,
    safely,
)

SOURCE_NAME_TAG = "mlflow.source.name"  # MLflow's own: the runs table's "Source" column
NOTE_TAG = "mlflow.note.content"  # MLflow's own: the run's description (markdown)
TRIAL_TAG = "mocoray.trial_id"
TRANSFER_PREFIX = "transfer."
# job tag -> the linear / detection headline metrics copied onto the pretraining run (transfer.<name>)
TRANSFER_METRICS = {"linear": ("linear_top1", "linear_top5"), "detection": ("AP", "AP50", "AP75")}
CLI_NAMES = {"pretrain": "pretrain", "linear": "linear-eval", "detection": "detect", "sweep": "sweep", "study": "study"}
NOTE_LIMIT = 5000  # MLflow's limit on a tag value

_recipes: dict[str, str | None] = {}


def set_recipes(**recipes: str | None) -> None:
    """Record which recipe each job of this command runs (by job tag: pretrain, linear, detection, sweep), in
    place of what an earlier command recorded; the CLI calls this, and a chained job (`--then-linear-eval
    RECIPE`) finds its own recipe here."""
    _recipes.clear()
    _recipes.update(recipes)


def source_name(job: str, recipe: str | None = None, trial_id: str | None = None) -> str:
    """`mocoray <job> <recipe file name>` (+ ` trial <id>`): the recipe given, else the one this command recorded."""
    recipe = recipe or _recipes.get(job)
    words = ["mocoray", CLI_NAMES.get(job, job)]
    if recipe:
        words.append(os.path.basename(str(recipe).rstrip("/")))
    if trial_id:
        words += ["trial", trial_id]
    return " ".join(words)


def log_transfer(uri: str, pretrain_run_id: str, job: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Copy a downstream run's headline `metrics` onto its pretraining run as `transfer.<name>`, at the step
    after the last one logged there (re-running an evaluation adds a value; the table shows the newest)."""
    from mlflow.entities import Metric

    values = {f"{TRANSFER_PREFIX}{k}": float(metrics[k]) for k in TRANSFER_METRICS[job] if metrics.get(k) is not None}
    if not values:
        return {}
    last = [last_logged_step(uri, pretrain_run_id, k) for k in values]
    step = max((s for s in last if s is not None), default=-1) + 1
    now = int(time.time() * 1000)
    client(uri).log_batch(pretrain_run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
    return values


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cell(_column: str, value: Any) -> str:
    """A ranking-table cell: numbers (params arrive as text) to 4 significant digits, the rest as it is."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if isinstance(value, str) and number.is_integer() else f"{number:.4g}"


def _ids(runs: list) -> str:
    return ", ".join(f"`{r.info.run_id}` ({r.info.run_name})" for r in runs)


def _pretrain_note(c, run) -> list[str]:
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    lines = [f"**MoCo {p.get('moco.version', '')} pretraining** of `{p.get('model.arch')}` on "
             f"{p.get('data.name')}: K={p.get('moco.queue_size')}, m={p.get('moco.momentum')}, "
             f"tau={_cell('', p.get('moco.temperature'))}, {p.get('optim.epochs')} epochs."]
    for key, label in (("knn", "kNN"), ("logreg", "Logistic-regression")):
        history = c.get_metric_history(run.info.run_id, f"{key}_top1") if f"{key}_top1" in m else []
        epoch = max((h.step for h in history), default=0)
        if epoch > 0:  # step 0 is the random-init encoder: nothing measured after training yet
            margin = f", margin {m[f'{key}_margin']:+.4f}" if f"{key}_margin" in m else ""
            init = f" (random init {_fmt(m[f'{key}_top1_init'])}{margin})" if f"{key}_top1_init" in m else ""
            lines.append(f"{label} top-1 **{_fmt(m[f'{key}_top1'])}**{init} at epoch {epoch}.")
    transfer = {k[len(TRANSFER_PREFIX):]: v for k, v in m.items() if k.startswith(TRANSFER_PREFIX)}
    if transfer:
        lines.append("Transfer: " + ", ".join(f"{k} **{_fmt(v)}**" for k, v in sorted(transfer.items())) + ".")
    if tags.get(STATUS_TAG) == "early_stopped":
        lines.append(f"Stopped early by the sweep's scheduler after {tags.get('mocoray.epochs_run')} of "
                     f"{tags.get('mocoray.epochs_planned')} epochs.")
    if tags.get(SWEEP_RUN_TAG):
        lines.append(f"Trial `{tags.get(TRIAL_TAG)}` of sweep run `{tags[SWEEP_RUN_TAG]}`.")
    for job, label in (("linear", "Linear evaluations"), ("detection", "Detection transfers")):
        downstream = c.search_runs([e.experiment_id for e in c.search_experiments()], filter_string=(
            f"tags.`{JOB_TAG}` = '{job}' and tags.`{PRETRAIN_RUN_TAG}` = '{run.info.run_id}'"))
        if downstream:
            lines.append(f"{label}: {_ids(downstream)}.")
    return lines


def _downstream_note(run) -> list[str]:
    p, m, tags, job = run.data.params, run.data.metrics, run.data.tags, run.data.tags.get(JOB_TAG)
    what = (f"**Linear evaluation** ({p.get('linear.mode')})" if job == "linear"
            else f"**Detection transfer** ({p.get('model.layout')}, {p.get('data.name')})")
    source = (f"of pretraining run `{tags[PRETRAIN_RUN_TAG]}`" if tags.get(PRETRAIN_RUN_TAG)
              else f"of `{tags.get('mocoray.checkpoint')}`")
    lines = [f"{what} {source}, checkpoint `{tags.get('mocoray.checkpoint')}`."]
    if job == "linear" and "linear_top1" in m:
        top1, top5 = m.get("linear_top1_final", m["linear_top1"]), m.get("linear_top5_final", m.get("linear_top5"))
        lines.append(f"Linear top-1 **{_fmt(top1)}**, top-5 {_fmt(top5)} after {p.get('optim.epochs')} epochs.")
    if job == "detection" and "AP" in m:
        lines.append(f"AP **{_fmt(m['AP'])}**, AP50 {_fmt(m.get('AP50'))}, AP75 {_fmt(m.get('AP75'))}.")
    return lines


def sweep_ranking(c, parent) -> tuple[list[str], list[dict[str, Any]]]:
    """The trials of sweep run `parent` ranked by its metric: (columns, rows), with their transfer results."""
    p = parent.data.params
    metric, mode = p.get("metric", "knn_top1"), p.get("mode", "max")
    space = sorted(k[len("space."):] for k in p if k.startswith("space."))
    trials = c.search_runs([parent.info.experiment_id],
                           filter_string=f"tags.`{SWEEP_RUN_TAG}` = '{parent.info.run_id}'", max_results=1000)
    rows, transfer_cols = [], set()
    for t in trials:
        history = [h.value for h in c.get_metric_history(t.info.run_id, metric)]
        best = (max(history) if mode == "max" else min(history)) if history else None
        row = {"trial": t.data.tags.get(TRIAL_TAG), **{k: t.data.params.get(k) for k in space},
               f"best {metric}": best, "status": t.data.tags.get(STATUS_TAG, t.info.status.lower()),
               "run id": t.info.run_id}
        for k, v in t.data.metrics.items():
            if k.startswith(TRANSFER_PREFIX):
                row[k] = v
                transfer_cols.add(k)
        rows.append(row)
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (r[f"best {metric}"] is None, sign * (r[f"best {metric}"] or 0.0)))
    columns = ["trial", *space, f"best {metric}", *sorted(transfer_cols), "status", "run id"]
    return columns, rows


def _sweep_note(c, run) -> list[str]:
    p = run.data.params
    space = ", ".join(k[len("space."):] for k in sorted(p) if k.startswith("space."))
    lines = [f"**Ray Tune sweep** `{run.info.run_name}` over {space}: {p.get('num_samples')} sample(s), "
             f"{p.get('scheduler.type')} scheduler, ranked by {p.get('metric')} ({p.get('mode')})."]
    columns, rows = sweep_ranking(c, run)
    if rows:
        best = run.data.tags.get("mocoray.best_run_id")
        if best:
            lines.append(f"Best trial: `{run.data.tags.get('mocoray.best_trial_id')}`, run `{best}`.")
        lines.append(render_table(rows, columns, "markdown", cell=_cell, missing="-"))
    return lines


def describe(uri: str, run_id: str) -> str:
    """The markdown description of run `run_id`, from what the store holds about it and its linked runs."""
    c = client(uri)
    run = c.get_run(run_id)
    job = run.data.tags.get(JOB_TAG)
    if job == "pretrain":
        lines = _pretrain_note(c, run)
    elif job in ("linear", "detection"):
        lines = _downstream_note(run)
    elif job == "sweep":
        lines = _sweep_note(c, run)
    else:
        lines = [f"mocoray {job} run."]
    parent = run.data.tags.get(MLFLOW_PARENT_TAG)
    if parent and job != "pretrain":
        lines.append(f"Parent run: `{parent}`.")
    text = "\n\n".join(lines)
    return text if len(text) <= NOTE_LIMIT else text[: NOTE_LIMIT - 30] + "\n\n(cut: see trials.csv)"


def update_description(uri: str | None, run_id: str | None) -> None:
    """Rewrite run `run_id`'s description from the store (nothing without a run); a tracking failure only warns."""
    if uri and run_id:
        safely("writing the run's description", lambda: client(uri).set_tag(run_id, NOTE_TAG, describe(uri, run_id)))
