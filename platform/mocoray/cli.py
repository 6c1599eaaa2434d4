"""The `mocoray` command: pretrain, linear-eval, detect, compare, sweep, export, register, submit, make-parquet."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from . import __version__
from .config import ConfigError
from .jobs.interrupts import JobInterrupted


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML recipe (experiments/*.yaml); omitted: the embedded CPU demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set moco.queue_size=4096 (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")


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


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .config import load_config
    from .config.pretrain import DEFAULT_RECIPE
    from .jobs.pretrain import PretrainFailed, PretrainInterrupted, run_pretrain

    cfg = load_config(args.recipe or DEFAULT_RECIPE, args.overrides)
    if args.print_config:
        return _print_config(cfg)
    try:
        res = run_pretrain(cfg, address=args.address, resume=args.resume, resume_from=args.resume_from)
    except PretrainFailed as err:
        print(f"mocoray pretrain: {err}", file=sys.stderr)
        if isinstance(err, PretrainInterrupted) and not args.resume and "--resume" in str(err):
            print(f"  mocoray {shlex.join([*args.argv, '--resume'])}", file=sys.stderr)
        return err.exit_code
    m = res.metrics
    print(f"\nrun dir:     {res.run_dir}\ncheckpoint:  {res.checkpoint}\nbackbone:    {res.backbone_path}")
    if "knn_top1" in m:
        print(f"kNN top-1:   {m['knn_top1']:.4f} (random init {m['knn_top1_init']:.4f}, "
              f"margin {m['knn_margin']:+.4f}) after {m['epoch']} epochs")
    if "logreg_top1" in m:
        print(f"logreg top-1: {m['logreg_top1']:.4f} (random init {m['logreg_top1_init']:.4f}, "
              f"margin {m['logreg_margin']:+.4f}): logistic regression on standardised backbone features")
    if "knn_top1" in m:
        print("             (both encoders with BN statistics recomputed on training images)" if cfg.knn.precise_bn
              else "             (random init with BN statistics recomputed on training images)")
    if res.mlflow_run_id:
        print(f"MLflow run:  {res.mlflow_run_id} at {res.tracking_uri}")
    if res.unsent_metrics:
        print(f"unsent:      {res.unsent_metrics}: what the MLflow server never took (it did not answer at the "
              "end); the run stays RUNNING there")
    rc = _chain_linear_eval(args, res) if args.then_linear_eval else 0
    if args.then_detect and rc == 0:
        rc = _chain_detect(args, res)
    return rc


def _print_config(cfg) -> int:
    from .config import dump_yaml

    print(dump_yaml(cfg), end="")
    return 0


def _downstream_values(res, suffix: str) -> dict:
    """Config values of a job chained after pretraining run `res`: its encoder, and a run named
    `<run.name>-<suffix>` stored next to it (in its MLflow experiment, when it was tracked)."""
    storage_path, name = res.run_dir.rstrip("/").rsplit("/", 1)
    values = {"run.name": f"{name}-{suffix}", "run.storage_path": storage_path}
    if res.mlflow_run_id:
        values.update({"encoder.pretrain_run": res.mlflow_run_id, "tracking.tracking_uri": res.tracking_uri})
    else:
        values.update({"encoder.checkpoint": res.checkpoint, "tracking.enabled": False})
    return values


def _chain_linear_eval(args: argparse.Namespace, res) -> int:
    """`pretrain --then-linear-eval RECIPE`: evaluate the run that just finished, in its MLflow experiment."""
    from .config import load_linear_config

    cfg = load_linear_config(args.then_linear_eval, args.linear_overrides, _downstream_values(res, "linear"))
    return _linear_eval(cfg, args.address)


def _chain_detect(args: argparse.Namespace, res) -> int:
    """`pretrain --then-detect RECIPE`: detection transfer of the run that just finished."""
    from .config import load_detect_config

    cfg = load_detect_config(args.then_detect, args.detect_overrides, _downstream_values(res, "detect"))
    return _detect(cfg, args.address)


def _downstream(command: str, run, failed: type[Exception], cfg, address: str | None, resume: bool,
                result_line) -> int:
    """Run a job on an encoder (`run(cfg, address=, resume=)`, raising `failed` when it does not complete) and
    print where its results are; `result_line(result)` says what it measured."""
    try:
        res = run(cfg, address=address, resume=resume)
    except failed as err:
        print(f"mocoray {command}: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 1)  # 130 / 143 after an interrupt
    except (LookupError, ValueError) as err:  # unknown run, unusable checkpoint, wrong architecture
        print(f"mocoray {command}: {err}", file=sys.stderr)
        return 2
    print(f"\nencoder:     {res.encoder.label} ({res.encoder.arch})\nrun dir:     {res.run_dir}\n"
          f"checkpoint:  {res.checkpoint}")
    print(result_line(res))
    if res.mlflow_run_id:
        link = f", pretraining run {res.encoder.pretrain_run_id}" if res.encoder.pretrain_run_id else ""
        print(f"MLflow run:  {res.mlflow_run_id} at {res.tracking_uri}{link}")
    return 0


def _linear_eval(cfg, address: str | None, resume: bool = False) -> int:
    from .jobs.linear import LinearEvalFailed, run_linear_eval

    def result_line(res) -> str:
        m = res.metrics
        return (f"linear top-1 {m['linear_top1']:.4f}  top-5 {m['linear_top5']:.4f} after {m['epoch']} epochs "
                f"({cfg.linear.mode} protocol; backbone unchanged)")

    return _downstream("linear-eval", run_linear_eval, LinearEvalFailed, cfg, address, resume, result_line)


def _encoder_flags(args: argparse.Namespace) -> dict:
    """The encoder source flags (see `_add_encoder_args`) as config values; unset flags left out."""
    flags = {"encoder.pretrain_run": args.pretrain_run, "encoder.checkpoint": args.checkpoint,
             "encoder.random_init": args.random_init or None, "encoder.arch": args.arch}
    return {k: v for k, v in flags.items() if v is not None}


def _cmd_linear_eval(args: argparse.Namespace) -> int:
    from .config import load_linear_config

    cfg = load_linear_config(args.recipe, args.overrides, _encoder_flags(args))
    if args.print_config:
        return _print_config(cfg)
    return _linear_eval(cfg, args.address, args.resume)


def _detect(cfg, address: str | None, resume: bool = False) -> int:
    from .jobs.detect import DetectionFailed, run_detection

    def result_line(res) -> str:
        m = res.metrics
        voc = f"  (VOC07 AP50 {m['VOC07_AP50']:.4f})" if "VOC07_AP50" in m else ""
        return (f"AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}{voc} after {m['global_step']} "
                f"iterations ({cfg.model.layout}, norm {cfg.model.effective_norm(cfg.run)})")

    return _downstream("detect", run_detection, DetectionFailed, cfg, address, resume, result_line)


def _cmd_detect(args: argparse.Namespace) -> int:
    from .config import load_detect_config
    from .config.detect import DEFAULT_RECIPE

    cfg = load_detect_config(args.recipe or DEFAULT_RECIPE, args.overrides, _encoder_flags(args))
    if args.print_config:
        print(f"# model.norm {cfg.model.norm} resolves to {cfg.model.effective_norm(cfg.run)} "
              f"(run.use_gpu={cfg.run.use_gpu}, run.num_workers={cfg.run.num_workers})")
        return _print_config(cfg)
    return _detect(cfg, args.address, args.resume)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import CompareError, compare_table, render, save_plot

    try:
        table = compare_table(args.tracking_uri, experiment=args.experiment, filter_string=args.filter,
                              sort=args.sort, ascending=args.ascending)
        fmt = "csv" if args.csv else "markdown" if args.markdown else "plain"
        print(render(table, fmt), end="")
        if args.plot:
            save_plot(table, args.plot, x=args.x, y=args.y, lines=args.lines)
            print(f"wrote {args.plot}", file=sys.stderr)
    except CompareError as err:
        print(f"mocoray compare: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .config import load_sweep_config
    from .config.sweep import dump_sweep
    from .jobs.linear import linear_eval_best
    from .jobs.sweep import SweepFailed, load_sweep_dir, run_sweep

    if args.then_linear_eval and not args.linear_recipe:
        raise ConfigError("--then-linear-eval N needs --linear-recipe RECIPE (e.g. experiments/linear_digits.yaml)")
    try:
        if args.resume:
            if args.recipe or args.overrides:
                raise ConfigError("--resume continues the sweep saved in its folder; give no recipe or --set")
            sweep = load_sweep_dir(args.resume)
        elif args.recipe:
            sweep = load_sweep_config(args.recipe, args.overrides)
        else:
            raise ConfigError("give a sweep recipe (experiments/sweep_*.yaml) or --resume <sweep folder>")
        if args.print_config:
            print(dump_sweep(sweep), end="")
            return 0
        res = run_sweep(sweep, address=args.address, resume=bool(args.resume), retry_errored=args.retry_errored)
    except SweepFailed as err:
        print(f"mocoray sweep: {err}", file=sys.stderr)
        return 1
    if res.interrupted:
        return 130
    if res.parent_run_id:
        print(f"MLflow sweep run: {res.parent_run_id} at {res.tracking_uri}")
    if args.then_linear_eval:
        linear_eval_best(res, sweep, args.then_linear_eval, args.linear_recipe, args.linear_overrides, args.address)
    return 0 if res.best is not None else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from .config import TrackingConfig
    from .config.linear import EncoderConfig
    from .encoders import backbone_state_dict, export_backbone, resolve_encoder, weights_path
    from .tracking_artifacts import is_artifact_uri

    if len(args.paths) != (1 if args.pretrain_run else 2):
        print("mocoray export: give CHECKPOINT OUT, or --pretrain-run RUN_ID OUT", file=sys.stderr)
        return 2
    *source, out = args.paths
    weights = source[0] if source else None
    if args.pretrain_run or is_artifact_uri(weights):  # found through the tracking server
        enc = EncoderConfig(pretrain_run=args.pretrain_run, checkpoint=weights)
        try:
            weights = weights_path(resolve_encoder(enc, TrackingConfig(tracking_uri=args.tracking_uri)))
        except (LookupError, ValueError) as err:
            print(f"mocoray export: {err}", file=sys.stderr)
            return 2
    if args.format == "detectron2":
        from .detectron2_export import save_detectron2

        try:
            payload = save_detectron2(backbone_state_dict(weights), out)  # type: ignore[arg-type]
        except ValueError as err:  # small_resnet / CIFAR stem: no detectron2 counterpart
            print(f"mocoray export: {err}", file=sys.stderr)
            return 2
        print(f"wrote {len(payload['model'])} backbone tensors in detectron2's layout to {out}")
        return 0
    state = export_backbone(weights, out)  # type: ignore[arg-type]
    print(f"wrote {len(state)} backbone tensors to {out}")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from .registry import register_encoder
    from .tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        version = register_encoder(uri, args.run_id, args.name, args.alias, args.description)
    except (LookupError, ValueError) as err:
        print(f"mocoray register: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:  # the server refused (permissions, a name it does not accept, ...)
        print(f"mocoray register: MLflow at {uri}: {err.message.splitlines()[0][:300]}", file=sys.stderr)
        return 1
    aliases = "".join(f"  {version.name}@{a}" for a in version.aliases)
    results = ", ".join(f"{k} {v}" for k, v in version.tags.items() if not k.startswith("mocoray."))
    print(f"registered {version.uri}{aliases} from run {args.run_id} at {uri}"
          + (f"\n{results}" if results else "\n(no finished linear or detection run yet)"))
    return 0


def _cmd_make_parquet(args: argparse.Namespace) -> int:
    from .data.parquet import write_parquet_shards

    shards = write_parquet_shards(args.image_folder, args.out, images_per_shard=args.images_per_shard)
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    """Submit any mocoray command as a Ray job: the cluster runs it next to its workers."""
    import shlex
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    command = list(args.command_args)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print("mocoray submit: give the mocoray command to run, e.g. -- pretrain experiments/x.yaml", file=sys.stderr)
        return 2
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        print("mocoray submit: --address http://<head>:8265 (or $RAY_ADDRESS) is required", file=sys.stderr)
        return 2
    runtime_env: dict = {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
        runtime_env["excludes"] = [".git", ".venv", "mocoray_runs", "mlruns", "mlflow.db", "*.pt"]
    env_vars = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if k in os.environ}
    env_vars.update(dict(kv.split("=", 1) for kv in args.env))
    if env_vars:
        runtime_env["env_vars"] = env_vars
    client = JobSubmissionClient(address)
    entrypoint = "mocoray " + " ".join(shlex.quote(c) for c in command)
    deadline = time.time() + 120
    while True:  # a freshly started head has no job agent for its first seconds
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None,
                                       submission_id=args.job_id)
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)
    print(f"submitted {job_id}: {entrypoint}")
    if not args.wait:
        print(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while (status := client.get_job_status(job_id)) not in terminal:
        time.sleep(2)
    print(client.get_job_logs(job_id)[-4000:])
    print(f"job {job_id}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mocoray", description=__doc__)
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
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("sweep", help="Ray Tune sweep of pretraining runs over K, m, tau (any config field)")
    p.add_argument("recipe", nargs="?", help="sweep recipe (experiments/sweep_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="sweep field (num_samples=8, space.moco.queue_size={grid: [1024, 4096]}) or, "
                        "otherwise, base-recipe field (optim.epochs=3); repeatable")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
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
    from .tracking_artifacts import set_command_line

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


if __name__ == "__main__":
    sys.exit(main())
