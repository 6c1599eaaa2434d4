"""What a study concludes from its transfer table: rank correlations with bootstrap intervals, the best
configuration by each downstream metric (and whether the pretext metric picked it), seed noise, the plots.

Only trials that ran to the end count: an early-stopped trial's pretext metric is from fewer epochs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import SweepConfig
from ...tracking.transfer import KIND_METRICS
from ..sweep.report import heatmap_cells, save_heatmap

SEED_FIELD = "run.seed"
HEADLINE = {"linear": "linear_top1", "detection": "AP"}  # the metric a best configuration is chosen by


@dataclass
class Correlation:
    x: str
    y: str
    n: int
    rho: float | None  # None: fewer than 3 trials with both values, or a constant column
    low: float | None
    high: float | None

    @property
    def name(self) -> str:
        return f"spearman_{self.x}_vs_{self.y}"


def downstream_metrics(kinds: list[str]) -> list[str]:
    return [name for kind in kinds for name in KIND_METRICS[kind]]


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials that ran to the end."""
    return [r for r in rows if r["status"] == "completed"]


def _present(value: Any) -> bool:
    return isinstance(value, int | float) and value == value  # not None, not NaN


def spearman(rows: list[dict[str, Any]], x: str, y: str, samples: int, confidence: float, seed: int) -> Correlation:
    """Spearman's rho of columns `x` and `y` over the completed trials that have both, and a percentile
    bootstrap interval (trials resampled with replacement; resamples with a constant column are skipped)."""
    import numpy as np
    from scipy.stats import spearmanr

    pairs = [(r[x], r[y]) for r in comparable(rows) if _present(r.get(x)) and _present(r.get(y))]
    n = len(pairs)
    a = np.array([p[0] for p in pairs], dtype=float)
    b = np.array([p[1] for p in pairs], dtype=float)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return Correlation(x, y, n, None, None, None)
    rho = float(spearmanr(a, b).statistic)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        if np.ptp(a[idx]) > 0 and np.ptp(b[idx]) > 0:
            boot.append(float(spearmanr(a[idx], b[idx]).statistic))
    tail = (1.0 - confidence) / 2.0
    low, high = (float(np.quantile(boot, tail)), float(np.quantile(boot, 1.0 - tail))) if boot else (None, None)
    return Correlation(x, y, n, rho, low, high)


def correlations(rows: list[dict[str, Any]], metric: str, kinds: list[str], samples: int, confidence: float,
                 seed: int) -> list[Correlation]:
    """The pretext metric against every downstream metric, and linear top-1 against detection AP."""
    pairs = [(metric, m) for m in downstream_metrics(kinds)]
    if len(kinds) == 2:
        pairs.append((HEADLINE["linear"], HEADLINE["detection"]))
    return [spearman(rows, x, y, samples, confidence, seed) for x, y in pairs]


def config_key(row: dict[str, Any], space: list[str]) -> tuple:
    """A configuration: the swept values other than the seed."""
    return tuple(row[k] for k in space if k != SEED_FIELD)


@dataclass
class Ranked:
    """One configuration by one metric: its mean and spread over the seeds that ran it."""

    values: dict[str, Any]  # swept values (seed left out)
    mean: float
    std: float  # sample standard deviation over seeds; 0 with one seed
    n: int
    rows: list[dict[str, Any]]


def rank_configs(rows: list[dict[str, Any]], space: list[str], column: str, mode: str = "max") -> list[Ranked]:
    """Completed trials grouped by configuration (their seeds together), best mean first."""
    import numpy as np

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in comparable(rows):
        if _present(r.get(column)):
            groups.setdefault(config_key(r, space), []).append(r)
    ranked = []
    for members in groups.values():
        vals = np.array([m[column] for m in members], dtype=float)
        ranked.append(Ranked({k: members[0][k] for k in space if k != SEED_FIELD}, float(vals.mean()),
                             float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, len(vals), members))
    ranked.sort(key=lambda g: g.mean, reverse=(mode == "max"))
    return ranked


def within_seed_noise(ranked: list[Ranked]) -> bool | None:
    """Whether the best configuration's lead over the next is smaller than the seed spread of either (None:
    no runner-up, or a single seed: nothing to judge noise by)."""
    if len(ranked) < 2 or max(ranked[0].n, ranked[1].n) < 2:
        return None
    return abs(ranked[0].mean - ranked[1].mean) < max(ranked[0].std, ranked[1].std)


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def summary_markdown(name: str, rows: list[dict[str, Any]], space: list[str], metric: str, mode: str,
                     kinds: list[str], corrs: list[Correlation], best: dict[str, list[Ranked]],
                     confidence: float) -> str:
    """The study's `summary.md`: what transfers best, how well the pretext metric predicted it, how sure."""
    done = comparable(rows)
    early = sum(r["status"] == "early_stopped" for r in rows)
    lines = [f"# Study {name}", "",
             f"{len(rows)} trials, {len(done)} ran to the end" + (f", {early} stopped early (left out)" if early else "")
             + f"; pretext metric `{metric}` ({mode})."]
    failed = [(r["trial_id"], k, r.get(f"{k}_error")) for r in rows for k in kinds if r.get(f"{k}_status") == "failed"]
    if failed:
        lines += ["", "Failed downstream runs:"] + [f"- trial {t}, {k}: {e}" for t, k, e in failed]
    lines += ["", f"## Rank correlation (Spearman, {confidence:.0%} bootstrap interval)", "",
              "| x | y | trials | rho | interval |", "|---|---|---|---|---|"]
    for c in corrs:
        interval = "-" if c.low is None else f"[{_fmt(c.low)}, {_fmt(c.high)}]"
        lines.append(f"| {c.x} | {c.y} | {c.n} | {_fmt(c.rho)} | {interval} |")
    lines += ["", "## Best configuration", ""]
    pretext = best.get(metric) or []
    for column, ranked in best.items():
        if not ranked:
            lines.append(f"- by `{column}`: no completed trial has it")
            continue
        top = ranked[0]
        spread = f" ± {top.std:.4f} over {top.n} seeds" if top.n > 1 else ""
        text = f"- by `{column}`: {_describe(top.values)}: {top.mean:.4f}{spread}"
        noise = within_seed_noise(ranked)
        if noise is not None:
            lead = top.mean - ranked[1].mean
            text += (f"; its lead over the next ({_describe(ranked[1].values)}) is {lead:+.4f}, "
                     + ("WITHIN seed noise" if noise else "larger than the seed spread"))
        if column != metric and pretext:
            text += "; the pretext metric picks " + ("the same configuration" if pretext[0].values == top.values
                                                      else f"another one ({_describe(pretext[0].values)})")
        lines.append(text)
    return "\n".join(lines) + "\n"


def make_plots(rows: list[dict[str, Any]], sweep: SweepConfig, metric: str, kinds: list[str],
               out_dir: Path) -> list[Path]:
    """PNGs: each downstream metric against each swept field and against the pretext metric; for two grid
    fields, a heatmap per downstream metric over the trials that ran to the end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    styles = {"completed": ("o", "tab:blue", "ran to the end"), "early_stopped": ("x", "tab:orange", "stopped early")}

    def scatter(x: str, y: str, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for status, (marker, color, label) in styles.items():
            pts = [r for r in rows if r["status"] == status and _present(r.get(x)) and _present(r.get(y))]
            if pts:
                ax.scatter([r[x] for r in pts], [r[y] for r in pts], marker=marker, color=color, label=label)
        xs = [r[x] for r in rows if _present(r.get(x))]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 20:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(f"{sweep.name}: {y} vs {x}", fontsize="medium")
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    for y in downstream_metrics(kinds):
        if not any(_present(r.get(y)) for r in rows):
            continue
        scatter(metric, y, out_dir / f"{y}_vs_{metric}.png")
        for key in sweep.space:
            if all(_present(r.get(key)) for r in rows):
                scatter(key, y, out_dir / f"{y}_vs_{key}.png")
        heat = heatmap_cells(rows, sweep, y)
        if heat is None or np.isnan(heat[4]).all():
            continue
        paths.append(save_heatmap(heat, f"mean {y}, trials that ran to the end",
                                  out_dir / f"heatmap_{y}_{heat[0]}_{heat[1]}.png"))
    return paths
