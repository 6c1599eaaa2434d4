"""`mocoray compare`: one row per pretraining run, its key params joined with its downstream results.

Reads MLflow through its client API only (a local store or an `mlflow server` over HTTP). The join
follows the lineage tags: a linear or detection run names its pretraining run in
`mocoray.pretrain_run_id`; of several, the newest FINISHED one counts.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..table import FORMATS, render_table
from .client import JOB_TAG, PRETRAIN_RUN_TAG, client, effective_params, resolve_tracking_uri

log = logging.getLogger(__name__)


class CompareError(ValueError):
    """A compare request that cannot be answered (unknown experiment or column, bad filter, nothing to plot)."""


@dataclass(frozen=True)
class Column:
    name: str  # what the table prints
    aliases: tuple[str, ...] = ()  # what --sort / --x / --y / --lines also accept
    is_metric: bool = False


# The pretraining run's key params, under the YAML names (= MLflow param names) and short math names.
PARAMS = {
    "version": "moco.version",
    "arch": "model.arch",
    "epochs": "optim.epochs",
    "K": "moco.queue_size",
    "m": "moco.momentum",
    "tau": "moco.temperature",
    "bn_mode": "moco.bn_mode",
}
PARAM_ALIASES = {"K": ("queue_size",), "m": ("momentum",), "tau": ("temperature",)}
# A pretraining run without the param ran the config's default, v2 since the first release: an empty cell would
# read as "unknown" beside v3 rows. (v3 runs have no moco.queue_size, so their K stays empty.)
PARAM_DEFAULTS = {"moco.version": "v2"}
# Downstream metric names: the final value first; detectron2's names after ours; the first present is used.
LINEAR_METRICS = {
    "linear_top1": ("linear_top1_final", "linear_top1"),
    "linear_top5": ("linear_top5_final", "linear_top5"),
}
DETECTION_METRICS = {
    "AP": ("AP", "bbox_AP", "bbox/AP"),
    "AP50": ("AP50", "bbox_AP50", "bbox/AP50"),
    "AP75": ("AP75", "bbox_AP75", "bbox/AP75"),
}
COLUMNS = (
    Column("run_id"),
    Column("run", ("run_name",)),
    *(Column(short, (long, *PARAM_ALIASES.get(short, ()))) for short, long in PARAMS.items()),
    Column("knn_top1", ("knn",), True),
    Column("linear_top1", ("linear", "top1"), True),
    Column("linear_top5", ("top5",), True),
    *(Column(name, (), True) for name in DETECTION_METRICS),
    Column("registered", ("model",)),  # shown only when a run of the table is in the Model Registry
    Column("alias", ("aliases",)),
)
REGISTRY_COLUMNS = ("registered", "alias")


@dataclass
class CompareTable:
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)


def column(name: str) -> Column:
    """The column called `name` or one of its aliases (case-insensitive)."""
    for col in COLUMNS:
        if name.lower() in (col.name.lower(), *(a.lower() for a in col.aliases)):
            return col
    known = ", ".join(f"{c.name} ({'/'.join(c.aliases)})" if c.aliases else c.name for c in COLUMNS)
    raise CompareError(f"unknown column {name!r}; columns: {known}")


def _number(text: str | None) -> Any:
    """MLflow params are strings: '4096' -> 4096, '0.99' -> 0.99, 'v2' -> 'v2'."""
    if text is None or text in ("", "None"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _all_pages(search, *args, **kwargs) -> list:
    """Every result of an MLflow search (runs, model versions, registered models), page by page."""
    items, token = [], None
    while True:
        page = search(*args, page_token=token, **kwargs)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _search_all(c, experiment_ids: list[str], filter_string: str) -> list:
    return _all_pages(c.search_runs, experiment_ids, filter_string=filter_string, max_results=1000,
                      order_by=["attributes.start_time ASC"])


def _experiment_ids(c, experiment: str | None, uri: str) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in c.search_experiments()]
    exp = c.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = ", ".join(sorted(e.name for e in c.search_experiments())) or "none"
        raise CompareError(f"no experiment {experiment!r} at {uri} (experiments there: {names})")
    return [exp.experiment_id]


def _newest_finished(runs: list) -> dict[str, Any]:
    """pretrain run id -> the newest FINISHED downstream run that names it."""
    out: dict[str, Any] = {}
    for run in runs:
        parent = run.data.tags.get(PRETRAIN_RUN_TAG)
        if not parent or run.info.status != "FINISHED":
            continue
        if parent not in out or run.info.start_time > out[parent].info.start_time:
            out[parent] = run
    return out


def _first(metrics: dict[str, float], names: tuple[str, ...]) -> float | None:
    return next((metrics[n] for n in names if n in metrics), None)


def _results(linear_run, detection_run) -> dict[str, float | None]:
    """The downstream columns from a pretraining run's linear and detection runs (None: no such run)."""
    lin = linear_run.data.metrics if linear_run else {}
    det = detection_run.data.metrics if detection_run else {}
    return {**{name: _first(lin, names) for name, names in LINEAR_METRICS.items()},
            **{name: _first(det, names) for name, names in DETECTION_METRICS.items()}}


def downstream_results(tracking_uri: str, run_id: str) -> dict[str, float]:
    """linear_top1/5 and AP/AP50/AP75 of one pretraining run: its newest finished linear and detection
    runs, as `compare` shows them; only the values that exist."""
    c = client(tracking_uri)
    everywhere = [e.experiment_id for e in c.search_experiments()]
    newest = {}
    for job in ("linear", "detection"):
        runs = _search_all(c, everywhere, f"tags.`{JOB_TAG}` = '{job}' and tags.`{PRETRAIN_RUN_TAG}` = '{run_id}'")
        newest[job] = _newest_finished(runs).get(run_id)
    return {k: v for k, v in _results(newest["linear"], newest["detection"]).items() if v is not None}


def _registrations(c) -> dict[str, dict[str, str]]:
    """run id -> its registry columns: 'NAME/VERSION' of every model version made from it, and their aliases
    (none when the store has no Model Registry: the table goes without those columns)."""
    from mlflow.exceptions import MlflowException

    aliases: dict[tuple[str, str], list[str]] = {}
    try:
        for model in _all_pages(c.search_registered_models, max_results=1000):
            for alias, version in model.aliases.items():
                aliases.setdefault((model.name, str(version)), []).append(f"{model.name}@{alias}")
        versions = _all_pages(c.search_model_versions, max_results=10000)
    except MlflowException as err:
        log.warning("no registry columns: reading the Model Registry failed: %s", err.message.splitlines()[0][:200])
        return {}
    out: dict[str, dict[str, list[str]]] = {}
    for mv in versions:
        if mv.run_id:
            cols = out.setdefault(mv.run_id, {"registered": [], "alias": []})
            cols["registered"].append(f"{mv.name}/{mv.version}")
            cols["alias"] += aliases.get((mv.name, str(mv.version)), [])
    return {rid: {k: " ".join(sorted(v)) for k, v in cols.items()} for rid, cols in out.items()}


def open_store(uri: str):
    """A client for an existing store: a local store that is not there is not created (a mistyped path would
    otherwise leave an empty database behind), and a server that does not answer is named as the problem."""
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme) and not Path(uri[len(scheme):]).exists():
            raise CompareError(f"no MLflow store at {uri[len(scheme):]} (from {uri}); check --tracking-uri or "
                               "$MLFLOW_TRACKING_URI")
    c = client(uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as err:
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise CompareError(f"cannot reach the MLflow tracking server at {uri}: {first}") from None
    return c


def compare_table(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    filter_string: str | None = None,
    sort: str | None = None,
    ascending: bool = False,
) -> CompareTable:
    """Pretraining runs (in `experiment`, else in all experiments) matching the MLflow `filter_string`,
    joined with their newest finished linear and detection runs (found in any experiment); in start
    order unless sorted by a column (`sort`, largest first unless `ascending`; empty cells last)."""
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    c = open_store(uri)
    sort_col = column(sort) if sort else None
    try:
        exp_ids = _experiment_ids(c, experiment, uri)
        query = f"tags.`{JOB_TAG}` = 'pretrain'" + (f" and {filter_string}" if filter_string else "")
        pretrain = _search_all(c, exp_ids, query) if exp_ids else []
    except MlflowException as err:
        raise CompareError(f"MLflow search failed ({err.message.splitlines()[0][:300]}); --filter uses MLflow's "
                           "syntax, e.g. \"params.`moco.queue_size` = '4096'\"") from None
    everywhere = [e.experiment_id for e in c.search_experiments()]
    linear = _newest_finished(_search_all(c, everywhere, f"tags.`{JOB_TAG}` = 'linear'"))
    detection = _newest_finished(_search_all(c, everywhere, f"tags.`{JOB_TAG}` = 'detection'"))
    registered = _registrations(c)

    rows = []
    for run in pretrain:
        rid, metrics = run.info.run_id, run.data.metrics
        params = {**PARAM_DEFAULTS, **effective_params(run.data.params, run.data.tags)}
        row: dict[str, Any] = {"run_id": rid, "run": run.info.run_name}
        row.update({short: _number(params.get(long)) for short, long in PARAMS.items()})
        row["knn_top1"] = metrics.get("knn_top1")
        row.update(_results(linear.get(rid), detection.get(rid)))
        row.update(registered.get(rid, dict.fromkeys(REGISTRY_COLUMNS)))
        rows.append(row)
    if sort_col:
        present = [r for r in rows if r[sort_col.name] is not None]
        missing = [r for r in rows if r[sort_col.name] is None]
        try:
            present.sort(key=lambda r: r[sort_col.name], reverse=not ascending)
        except TypeError:  # mixed numbers and text: compare as text
            present.sort(key=lambda r: str(r[sort_col.name]), reverse=not ascending)
        rows = present + missing
    shown = [col.name for col in COLUMNS
             if col.name not in REGISTRY_COLUMNS or any(r[col.name] for r in rows)]
    return CompareTable(shown, rows)


def render(table: CompareTable, fmt: str = "plain") -> str:
    """The table as 'plain' (aligned text), 'csv' (exact values) or 'markdown'."""
    if fmt not in FORMATS:
        raise CompareError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "plain" and not table.rows:
        return "no pretraining runs (tag mocoray.job=pretrain) matched\n"
    metrics = {c.name for c in COLUMNS if c.is_metric}

    def cell(name: str, value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) and name in metrics else str(value)

    return render_table(table.rows, table.columns, fmt, cell)


def save_plot(table: CompareTable, path: str, x: str = "queue_size", y: str = "linear_top1",
              lines: str | None = "momentum") -> int:
    """Draw `y` against `x`, one line per value of `lines`, into a PNG at `path` (local or URL).

    Returns the number of points drawn; raises CompareError when no run has both values.
    """
    import fsspec
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xc, yc = column(x), column(y)
    gc = column(lines) if lines else None
    groups: dict[Any, list[tuple[float, float]]] = {}
    for row in table.rows:
        xv, yv = row.get(xc.name), row.get(yc.name)
        if isinstance(xv, (int, float)) and isinstance(yv, (int, float)) and not math.isnan(yv):
            groups.setdefault(row.get(gc.name) if gc else None, []).append((float(xv), float(yv)))
    if not groups:
        raise CompareError(f"nothing to plot: no run has both {xc.name} and {yc.name} (numeric)")

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in sorted(groups, key=lambda k: (k is None, str(k) if not isinstance(k, (int, float)) else k)):
        points = sorted(groups[key])
        label = f"{gc.name} = {key}" if gc else None
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    xs = [p[0] for pts in groups.values() for p in pts]
    if min(xs) > 0 and max(xs) / min(xs) >= 8:  # queue sizes and the like span powers of two
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xc.name if not xc.aliases else f"{xc.name} ({xc.aliases[0]})")
    ax.set_ylabel(yc.name)
    ax.set_title(f"{yc.name} vs {xc.name}")
    ax.grid(True, alpha=0.3)
    if gc:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())
    return sum(len(p) for p in groups.values())
