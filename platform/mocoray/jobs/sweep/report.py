"""What a finished sweep reports: one row per trial, the best trial and its recipe, the table, the plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config import PretrainConfig, SweepConfig, build
from ...config.common import set_dotted
from ...config.sweep import trial_base
from ...table import render_table


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """run.name of a trial's Ray Train run: deterministic, so a restarted trial resumes its own run."""
    return f"{sweep_name}-{trial_id}"


def python_value(value: Any) -> Any:
    """numpy scalars from Tune's samplers -> Python values (pydantic and YAML want those)."""
    import numpy as np

    return value.item() if isinstance(value, np.generic) else value


def trial_rows(results, sweep: SweepConfig, base: PretrainConfig, train_storage: str) -> list[dict[str, Any]]:
    """One row per trial of Tune's `results`: its values, best metric, epochs run and status."""
    rows = []
    for r in results:
        trial_id = Path(r.path).name.removeprefix("trial_")
        df = r.metrics_dataframe
        has = df is not None and not df.empty and sweep.metric in df
        values = df[sweep.metric].dropna() if has else None
        best = None
        if values is not None and len(values):
            best = float(values.max() if sweep.mode == "max" else values.min())
        epochs_run = int(df["epoch"].max()) if has and "epoch" in df else 0
        planned = int(python_value(r.config.get("optim.epochs", base.optim.epochs)))
        if r.error is not None:
            status = "error"
        elif epochs_run >= planned:
            status = "completed"
        elif epochs_run == 0:
            status = "not_started"
        else:
            status = "early_stopped"
        row = {"trial_id": trial_id}
        row.update({key: python_value(r.config.get(key)) for key in sweep.space})
        row.update({f"best_{sweep.metric}": best, "epochs": epochs_run, "planned_epochs": planned,
                    "status": status, "run_dir": f"{train_storage}/{trial_run_name(sweep.name, trial_id)}"})
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial_id"])


def pick_best(rows: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any] | None:
    """Best metric among completed trials (early-stopped ones only if none completed)."""
    col = f"best_{sweep.metric}"
    scored = [r for r in rows if r[col] is not None and r["status"] == "completed"]
    scored = scored or [r for r in rows if r[col] is not None and r["status"] != "error"]
    if not scored:
        return None
    sign = 1.0 if sweep.mode == "max" else -1.0
    return max(scored, key=lambda r: sign * r[col])


def best_config(sweep: SweepConfig, best: dict[str, Any]) -> PretrainConfig:
    """The best trial's full recipe, renamed to a fresh run in the base recipe's storage."""
    assert isinstance(sweep.base, dict)
    data = trial_base(sweep).model_dump(mode="json")
    for key in sweep.space:
        set_dotted(data, key, best[key])
    data["run"]["name"] = f"{sweep.name}-best"
    data["run"]["storage_path"] = sweep.base["run"]["storage_path"]
    return build(PretrainConfig, data)


def trial_table(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    columns = ["trial_id", *sweep.space, f"best_{sweep.metric}", "epochs", "status"]
    return render_table(rows, columns, cell=lambda _c, v: f"{v:.4g}" if isinstance(v, float) else str(v),
                        missing="-")


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _log_axis(sweep: SweepConfig, key: str, values: list[Any]) -> bool:
    spec = sweep.space[key]
    if spec.kind == "loguniform":
        return True
    positive = _numeric(values) and values and min(values) > 0
    return bool(positive and max(values) / min(values) >= 20)


def heatmap_cells(rows: list[dict[str, Any]], sweep: SweepConfig, col: str | None = None):
    """(a, b, a's values, b's values, mean of `col` (default: the best metric) per (b, a) cell) over the
    space's first two grid fields, or None with fewer than two. Only trials that ran to the end count: a
    trial the scheduler stopped after one epoch is not comparable with one that ran them all (its cell stays
    empty when no trial there completed). Trials differing in other fields (a third grid such as run.seed,
    or drawn values) share a cell: the mean is what a K x tau picture over several seeds should show."""
    import numpy as np

    grids = [k for k, spec in sweep.space.items() if spec.kind == "grid"]
    if len(grids) < 2:
        return None
    a, b = grids[:2]
    col = col or f"best_{sweep.metric}"
    done = [r for r in rows if r["status"] == "completed" and r.get(col) is not None and r[col] == r[col]]
    xs, ys = sweep.space[a].values, sweep.space[b].values
    cells = np.full((len(ys), len(xs)), np.nan)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            hits = [r[col] for r in done if r[a] == x and r[b] == y]
            if hits:
                cells[i, j] = float(np.mean(hits))
    return a, b, xs, ys, cells


def save_heatmap(heat: tuple, title: str, path: Path) -> Path:
    """Draw `heatmap_cells`' grid with each cell's value written in it (a dash where no trial counts)."""
    import matplotlib.pyplot as plt
    import numpy as np

    a, b, xs, ys, cells = heat
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.8 * len(ys) + 2))
    im = ax.imshow(cells, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    for i in range(len(ys)):
        for j in range(len(xs)):
            ax.text(j, i, "-" if np.isnan(cells[i, j]) else f"{cells[i, j]:.3f}", ha="center", va="center",
                    color="w", fontsize="small")
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.set_title(title, fontsize="medium")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def make_plots(rows: list[dict[str, Any]], sweep: SweepConfig, out_dir: Path) -> list[Path]:
    """PNG per searched field (best metric vs the field's value) and a heatmap of the first two grid fields."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    col = f"best_{sweep.metric}"
    scored = [r for r in rows if r[col] is not None]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if not scored:
        return paths
    styles = {"completed": ("o", "tab:blue"), "early_stopped": ("x", "tab:orange")}
    for key in sweep.space:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        values = [r[key] for r in scored]
        numeric = _numeric(values)
        categories = sorted({str(v) for v in values})
        for status, (marker, color) in styles.items():
            pts = [r for r in scored if r["status"] == status]
            if pts:
                xs = [r[key] if numeric else categories.index(str(r[key])) for r in pts]
                ax.scatter(xs, [r[col] for r in pts], marker=marker, color=color, label=status.replace("_", " "))
        if numeric and _log_axis(sweep, key, values):
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(key)
        ax.set_ylabel(col)
        ax.set_title(f"{sweep.name}: {col} vs {key}")
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{sweep.metric}_vs_{key}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    heat = heatmap_cells(scored, sweep)
    if heat is not None:
        a, b = heat[0], heat[1]
        others = [k for k in sweep.space if k not in (a, b)]
        left_out = sum(r["status"] != "completed" for r in scored)
        title = (f"mean {col}" + (f" over {', '.join(others)}" if others else "")
                 + (f"\ntrials that ran to the end ({left_out} stopped early left out)" if left_out else ""))
        paths.append(save_heatmap(heat, title, out_dir / f"heatmap_{a}_{b}.png"))
    return paths
