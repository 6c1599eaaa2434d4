"""The `mocoray` command line: its arguments and `main`, which maps errors to exit codes."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..config import ConfigError
from ..jobs.console import release_terminal
from ..jobs.interrupts import JobInterrupted
from .commands import (
    _cmd_compare,
    _cmd_detect,
    _cmd_export,
    _cmd_linear_eval,
    _cmd_make_parquet,
    _cmd_pretrain,
    _cmd_register,
    _cmd_study,
    _cmd_submit,
    _cmd_sweep,
    _cmd_ui,
)

DESCRIPTION = ("The `mocoray` command: pretrain, linear-eval, detect, compare, sweep, study, export, register, submit, "
               "make-parquet.")


def _add_config_args(p: argparse.ArgumentParser,
                     recipe_help: str = "YAML recipe (experiments/*.yaml); omitted: the embedded CPU demo",
                     set_help: str = "dotted override, e.g. --set moco.queue_size=4096 (repeatable)") -> None:
    """The arguments every job command takes: its recipe, --set overrides, the Ray address, --verbose."""
    p.add_argument("recipe", nargs="?", help=recipe_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    _add_verbose_arg(p)


def _add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's and MLflow's own log lines and the workers' output on the terminal "
                        "(always written to the run's mocoray.log); progress as plain lines")


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    """Recipe, --set, and where the encoder comes from: what the downstream jobs (linear-eval, detect) take."""
    _add_config_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--pretrain-run", default=None, metavar="RUN_ID",
                        help="MLflow run id of a pretraining run: uses its final checkpoint")
    source.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="checkpoint dir, exported backbone .pt or official MoCo .pth.tar (path or URL), "
                             "or a registered encoder: models:/NAME@ALIAS, models:/NAME/VERSION")
    source.add_argument("--random-init", action="store_true", help="a random-init backbone (the baseline)")
    p.add_argument("--arch", default=None, help="backbone architecture, for files without meta.json")
    p.add_argument("--resume", action="store_true", help="continue the run with the same run.name and storage")
    p.add_argument("--print-config", action="store_true", help="print the validated config and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mocoray", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"mocoray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="MoCo pretraining on Ray Train")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run with the same run.name and storage")
    p.add_argument("--resume-from", default=None, help="start from this checkpoint directory (weights, queue, epoch)")
    p.add_argument("--print-config", action="store_true", help="print the validated config and exit")
    p.add_argument("--then-linear-eval", metavar="RECIPE", default=None,
                   help="after pretraining, run the linear evaluation recipe on the final checkpoint")
    p.add_argument("--linear-set", dest="linear_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the chained linear evaluation, e.g. --linear-set optim.epochs=10")
    p.add_argument("--then-detect", metavar="RECIPE", default=None,
                   help="after pretraining (and the linear evaluation, if any), run the detection recipe on "
                        "the final checkpoint")
    p.add_argument("--detect-set", dest="detect_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the chained detection transfer, e.g. --detect-set optim.iterations=500")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("linear-eval", help="linear protocol on a frozen backbone (Ray Train)")
    _add_encoder_args(p)
    p.set_defaults(func=_cmd_linear_eval)

    p = sub.add_parser("detect", help="detection transfer: Faster R-CNN (C4 / FPN) from an encoder (Ray Train)")
    _add_encoder_args(p)
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser("compare", help="table of pretraining runs joined with their kNN, linear and detection results")
    p.add_argument("--experiment", default=None, help="MLflow experiment name (default: all experiments)")
    p.add_argument("--filter", default=None,
                   help="MLflow filter on the pretraining runs, e.g. \"params.`moco.queue_size` = '4096'\"")
    p.add_argument("--sort", default=None, metavar="COLUMN", help="sort by a column (descending), e.g. linear_top1")
    p.add_argument("--ascending", action="store_true", help="with --sort: smallest first")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", action="store_true", help="CSV output")
    out.add_argument("--markdown", action="store_true", help="Markdown table output")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="also draw --y against --x, one line per --lines")
    p.add_argument("--x", default="queue_size", help="param on the x axis (default: queue_size)")
    p.add_argument("--y", default="linear_top1", help="metric on the y axis (default: linear_top1)")
    p.add_argument("--lines", default="momentum", help="param with one line per value (default: momentum)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--study", default=None, metavar="RUN_ID",
                   help="instead: the transfer table of a study (its MLflow run id), one row per trial")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sweep", help="Ray Tune sweep of pretraining runs over K, m, tau (any config field)")
    _add_config_args(p, "sweep recipe (experiments/sweep_*.yaml)",
                     "sweep field (num_samples=8, space.moco.queue_size={grid: [1024, 4096]}) or, "
                     "otherwise, base-recipe field (optim.epochs=3); repeatable")
    p.add_argument("--resume", default=None, metavar="SWEEP_DIR",
                   help="continue the interrupted sweep in <storage_path>/<name> (finished trials are kept)")
    p.add_argument("--retry-errored", action="store_true", help="with --resume: run errored trials again")
    p.add_argument("--print-config", action="store_true", help="print the validated sweep config and exit")
    p.add_argument("--then-linear-eval", type=int, default=0, metavar="N",
                   help="after the sweep, linear evaluation of the best N completed trials")
    p.add_argument("--linear-recipe", default=None, metavar="RECIPE", help="linear evaluation recipe for those runs")
    p.add_argument("--linear-set", dest="linear_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for those linear evaluations, e.g. --linear-set optim.epochs=10")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("study", help="a sweep, then linear / detection runs on its trials, and which K, m, tau "
                                     "transfer best (analysis on the study's MLflow run)")
    _add_config_args(p, "study recipe (experiments/study_*.yaml)",
                     "study field (trials.top=2) or, prefixed with sweep., a sweep or base-recipe field "
                     "(sweep.num_samples=2, sweep.optim.epochs=3); repeatable")
    p.add_argument("--resume", default=None, metavar="STUDY_DIR",
                   help="continue the interrupted study in <storage_path>/<name> (finished runs are kept)")
    p.add_argument("--print-config", action="store_true", help="print the validated study config and exit")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("ui", help="serve the MLflow UI for the runs' store and print the address of an "
                                  "experiment's runs table")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--experiment", default=None,
                   help="experiment to open (default: the one with the newest run)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("export", help="write a checkpoint's query backbone as a plain torchvision state_dict "
                                      "(or in detectron2's layout)")
    p.add_argument("paths", nargs="+", metavar="[CHECKPOINT] OUT",
                   help="checkpoint directory or file (local or URL), models:/NAME@ALIAS or models:/NAME/VERSION; "
                        "then the output path (local or URL): .pt, or .pkl for --format detectron2")
    p.add_argument("--pretrain-run", default=None, metavar="RUN_ID",
                   help="instead of CHECKPOINT: a pretraining run (its checkpoint, else its encoder artifact)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--format", choices=["torchvision", "detectron2"], default="torchvision",
                   help="torchvision: a plain state_dict (default); detectron2: the weights pickle MoCo's "
                        "converter writes (stem / res2..res5 names), for moco/detection configs")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("register", help="register a pretraining run's encoder in the MLflow Model Registry")
    p.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a pretraining run")
    p.add_argument("--name", required=True, help="registered model name (created if new); each call adds a version")
    p.add_argument("--alias", action="append", default=[], help="alias pointing at the new version, e.g. champion")
    p.add_argument("--description", default=None, help="version description (default: the run's recipe and results)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("submit", help="run a mocoray command as a job on a Ray cluster (ray job submit)")
    p.add_argument("--address", default=None, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", default=None, help="folder shipped to the cluster (recipes, code)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the job")
    p.add_argument("--job-id", default=None, help="submission id (default: generated)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.add_argument("command_args", nargs=argparse.REMAINDER, help="-- <mocoray command and arguments>")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("make-parquet", help="convert an image folder (class sub-folders) to Parquet shards")
    p.add_argument("image_folder")
    p.add_argument("out", help="output folder (local or fsspec URL)")
    p.add_argument("--images-per-shard", type=int, default=1000)
    p.set_defaults(func=_cmd_make_parquet)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # the jobs are written for Ray Train V2
    from ..tracking.artifacts import set_command_line

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "export" and not any(e.startswith("-") for e in extra):
        args.paths += extra  # `export CHECKPOINT --format detectron2 OUT`: argparse leaves OUT over
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    set_command_line(["mocoray", *(sys.argv[1:] if argv is None else argv)])  # what each job's run records
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to repeat the command in hints
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"mocoray {args.command}: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"mocoray {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a job took over the signals (while loading, starting Ray, ...)
        print(f"mocoray {args.command}: interrupted", file=sys.stderr)
        return 130
    except JobInterrupted as sig:  # a second signal while the job was cleaning up after the first
        print(f"mocoray {args.command}: interrupted again ({sig.name}) while stopping", file=sys.stderr)
        return sig.exit_code
    finally:
        release_terminal()  # the command is over: a caller in the same process (a test, a notebook) gets it back
