"""Detection transfer through the job (`mocoray detect`): a MoCo encoder against random init, same schedule.

For each seed, the detection recipe (default `experiments/detect_digits.yaml`) runs twice through
`jobs.detect.run_detection` (Ray Train, MLflow): once from the pretraining run's encoder, once from a
random-init backbone of the same architecture (the reference). The seed sets the detector's new layers
(and the random backbone), the data order and the sampling; the canvases are the same for all runs.
Prints AP / AP50 / AP75 per run, their mean and spread per source, and training images/s (all workers,
from the job's own per-pass metric).

Examples:
    python benchmarks/detection_transfer.py --pretrain-recipe experiments/digits_moco_v2.yaml
    python benchmarks/detection_transfer.py --pretrain-run <run id> --tracking-uri sqlite:///mlflow.db --seeds 0,1,2
    python benchmarks/detection_transfer.py --smoke --storage /tmp/runs --tracking-uri sqlite:////tmp/mlflow.db

`--smoke` (what the tests run): the digits pretraining cut to 1 epoch of 2 steps (kNN bank of 64), then one seed of each
detector on 8 canvases for 1 pass, 1 worker each; the same code path and tables. `--address` runs the jobs
on a running Ray instead of a local one started here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _bench import REPO, ensure_mocoray_importable, machine_line, parse_with_smoke, table

ensure_mocoray_importable()

from mocoray.config import load_config, load_detect_config  # noqa: E402
from mocoray.encoders import resolve_encoder  # noqa: E402
from mocoray.jobs.detect.driver import run_detection  # noqa: E402
from mocoray.jobs.pretrain.driver import run_pretrain  # noqa: E402
from mocoray.tracking.client import client, resolve_tracking_uri  # noqa: E402

METRICS = ("AP", "AP50", "AP75")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--pretrain-run", help="MLflow run id of a finished pretraining run")
    source.add_argument("--pretrain-recipe", help="run this pretraining recipe first and use its encoder")
    p.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pretraining recipe override (repeatable)")
    p.add_argument("--recipe", default="experiments/detect_digits.yaml", help="detection recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="detection recipe override (repeatable), e.g. --set optim.epochs=2")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--storage", default="./mocoray_runs", help="run.storage_path of every run")
    p.add_argument("--name", default="transfer", help="prefix of the run names")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    p.add_argument("--json", default=None, help="save the figures here")
    args = parse_with_smoke(
        p, argv, pretrain_recipe=str(REPO / "experiments" / "digits_moco_v2.yaml"), seeds="0",
        pretrain_overrides=["data.max_images=64", "optim.batch_size=32", "optim.epochs=1", "moco.queue_size=32",
                            "knn.max_bank=64", "run.num_workers=1"],
        overrides=["data.train_canvases=8", "data.val_canvases=4", "optim.batch_size=4", "optim.epochs=1",
                   "optim.warmup=1", "optim.milestones=[2]", "run.num_workers=1"])
    if not (args.pretrain_run or args.pretrain_recipe):
        p.error("one of --pretrain-run or --pretrain-recipe is required")
    return args


def pretraining_run(args: argparse.Namespace, uri: str) -> str:
    if args.pretrain_run:
        return args.pretrain_run
    cfg = load_config(args.pretrain_recipe, [*args.pretrain_overrides, f"run.storage_path={args.storage}",
                                             f"run.name={args.name}-pretrain", f"tracking.tracking_uri={uri}"])
    t0 = time.perf_counter()
    res = run_pretrain(cfg, address=args.address)
    print(f"pretraining {res.mlflow_run_id}: kNN top-1 {res.metrics['knn_top1']:.4f} "
          f"(random init {res.metrics['knn_top1_init']:.4f}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return res.mlflow_run_id


def history(uri: str, run_id: str, key: str) -> list[float]:
    """The run's values of `key`, one per pass (step 1, 2, ...)."""
    return [m.value for m in sorted(client(uri).get_metric_history(run_id, key), key=lambda m: m.step) if m.step]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    uri = resolve_tracking_uri(args.tracking_uri)
    print(machine_line())
    pretrain_id = pretraining_run(args, uri)
    moco = {"encoder.pretrain_run": pretrain_id}
    probe = load_detect_config(args.recipe, [*args.overrides, f"tracking.tracking_uri={uri}"], moco)
    encoder = resolve_encoder(probe.encoder, probe.tracking)  # the random-init reference gets its architecture
    sources = {"moco": moco, "random-init": {"encoder.random_init": True, "encoder.arch": encoder.arch,
                                             "encoder.cifar_stem": encoder.cifar_stem}}
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for source, values in sources.items():
            overrides = [*args.overrides, f"run.seed={seed}", f"run.name={args.name}-{source}-s{seed}",
                         f"run.storage_path={args.storage}", f"tracking.tracking_uri={uri}"]
            cfg = load_detect_config(args.recipe, overrides, values)
            t0 = time.perf_counter()
            res = run_detection(cfg, address=args.address)
            wall = time.perf_counter() - t0
            row = {"source": source, "seed": seed, **{k: res.metrics[k] for k in METRICS},
                   "AP50_per_pass": history(uri, res.mlflow_run_id, "AP50"),
                   "images_per_s": statistics.mean(history(uri, res.mlflow_run_id, "images_per_s")),
                   "wall_s": wall, "mlflow_run_id": res.mlflow_run_id}
            rows.append(row)
            print(f"{source} seed {seed}: " + "  ".join(f"{k} {row[k]:.4f}" for k in METRICS)
                  + f"  {row['images_per_s']:.1f} images/s  {wall:.0f} s", flush=True)
    print(table(["source", "seed", *METRICS, "AP50 after each pass", "train images/s", "wall s"],
                [[r["source"], str(r["seed"]), *(f"{r[k]:.4f}" for k in METRICS),
                  " / ".join(f"{v:.3f}" for v in r["AP50_per_pass"]), f"{r['images_per_s']:.1f}",
                  f"{r['wall_s']:.0f}"] for r in rows]))
    summary = []
    for source in sources:
        mine = [r for r in rows if r["source"] == source]
        passes = list(zip(*(r["AP50_per_pass"] for r in mine), strict=True))
        summary.append([source, *(f"{statistics.mean(r[k] for r in mine):.4f} +- "
                                  f"{statistics.pstdev(r[k] for r in mine):.4f}" for k in METRICS),
                        " / ".join(f"{statistics.mean(p):.3f}" for p in passes)])
    print(table(["source", *(f"{k} mean +- std" for k in METRICS), "mean AP50 after each pass"], summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "pretrain_run": pretrain_id, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
