"""What each `mocoray` subcommand does: load its config, call one job, print the job's summary.

Each function takes the parsed arguments and returns the process's exit code.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..config import ConfigError
from ..tracking.describe import set_recipes


def _own_terminal(args: argparse.Namespace) -> None:
    """The job about to run prints through this process's terminal (see jobs/console.py); before Ray starts."""
    from ..jobs.console import own_terminal

    own_terminal(args.verbose)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..config.pretrain import DEFAULT_RECIPE
    from ..jobs.pretrain.driver import PretrainFailed, PretrainInterrupted, run_pretrain

    cfg = load_config(args.recipe or DEFAULT_RECIPE, args.overrides)
    if args.print_config:
        return _print_config(cfg)
    set_recipes(pretrain=args.recipe or DEFAULT_RECIPE, linear=args.then_linear_eval, detection=args.then_detect)
    _own_terminal(args)
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
    from ..config import dump_yaml

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
    from ..config import load_linear_config

    cfg = load_linear_config(args.then_linear_eval, args.linear_overrides, _downstream_values(res, "linear"))
    return _linear_eval(cfg, args.address)


def _chain_detect(args: argparse.Namespace, res) -> int:
    """`pretrain --then-detect RECIPE`: detection transfer of the run that just finished."""
    from ..config import load_detect_config

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
    from ..jobs.linear.driver import LinearEvalFailed, run_linear_eval

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
    from ..config import load_linear_config

    cfg = load_linear_config(args.recipe, args.overrides, _encoder_flags(args))
    if args.print_config:
        return _print_config(cfg)
    set_recipes(linear=args.recipe)
    _own_terminal(args)
    return _linear_eval(cfg, args.address, args.resume)


def _detect(cfg, address: str | None, resume: bool = False) -> int:
    from ..jobs.detect.driver import DetectionFailed, run_detection

    def result_line(res) -> str:
        m = res.metrics
        voc = f"  (VOC07 AP50 {m['VOC07_AP50']:.4f})" if "VOC07_AP50" in m else ""
        return (f"AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}{voc} after {m['global_step']} "
                f"iterations ({cfg.model.layout}, norm {cfg.model.effective_norm(cfg.run)})")

    return _downstream("detect", run_detection, DetectionFailed, cfg, address, resume, result_line)


def _cmd_detect(args: argparse.Namespace) -> int:
    from ..config import load_detect_config
    from ..config.detect import DEFAULT_RECIPE

    cfg = load_detect_config(args.recipe or DEFAULT_RECIPE, args.overrides, _encoder_flags(args))
    set_recipes(detection=args.recipe or DEFAULT_RECIPE)
    if args.print_config:
        print(f"# model.norm {cfg.model.norm} resolves to {cfg.model.effective_norm(cfg.run)} "
              f"(run.use_gpu={cfg.run.use_gpu}, run.num_workers={cfg.run.num_workers})")
        return _print_config(cfg)
    _own_terminal(args)
    return _detect(cfg, args.address, args.resume)


def _cmd_compare(args: argparse.Namespace) -> int:
    from ..tracking.compare import CompareError, compare_table, render, save_plot

    if args.study:
        return _compare_study(args)
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


def _recipe_or_resume(args: argparse.Namespace, what: str, load_recipe, load_dir):
    """The job `args` names: its recipe (with --set overrides) or, with --resume, the one saved in its folder."""
    if args.resume:
        if args.recipe or args.overrides:
            raise ConfigError(f"--resume continues the {what} saved in its folder; give no recipe or --set")
        return load_dir(args.resume)
    if args.recipe:
        return load_recipe(args.recipe, args.overrides)
    raise ConfigError(f"give a {what} recipe (experiments/{what}_*.yaml) or --resume <{what} folder>")


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..config import load_sweep_config
    from ..config.sweep import dump_sweep
    from ..jobs.linear.driver import linear_eval_best
    from ..jobs.sweep import SweepFailed, load_sweep_dir, run_sweep

    if args.then_linear_eval and not args.linear_recipe:
        raise ConfigError("--then-linear-eval N needs --linear-recipe RECIPE (e.g. experiments/linear_digits.yaml)")
    try:
        sweep = _recipe_or_resume(args, "sweep", load_sweep_config, load_sweep_dir)
        if args.print_config:
            print(dump_sweep(sweep), end="")
            return 0
        set_recipes(sweep=args.recipe, linear=args.linear_recipe)
        _own_terminal(args)
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


def _compare_study(args: argparse.Namespace) -> int:
    """`compare --study RUN_ID`: the study's transfer table, from the tracking server alone."""
    from ..table import render_table
    from ..tracking.client import resolve_tracking_uri
    from ..tracking.compare import CompareError, open_store
    from ..tracking.transfer import transfer_rows

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
        open_store(uri)
        rows, columns = transfer_rows(uri, args.study)
    except (CompareError, LookupError) as err:
        print(f"mocoray compare: {err}", file=sys.stderr)
        return 2
    fmt = "csv" if args.csv else "markdown" if args.markdown else "plain"
    if fmt == "plain":  # errors and run ids are long; the CSV has them
        columns = [c for c in columns if not c.endswith(("_error", "_run_id"))]
    print(render_table(rows, columns, fmt, cell=lambda _c, v: f"{v:.4f}" if isinstance(v, float) else str(v)), end="")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from ..config.study import dump_study, load_study_config
    from ..jobs.study import StudyFailed, load_study_dir, run_study

    try:
        study = _recipe_or_resume(args, "study", load_study_config, load_study_dir)
        set_recipes(study=args.recipe, sweep=args.recipe)
        if args.print_config:
            print(dump_study(study), end="")
            return 0
        _own_terminal(args)
        res = run_study(study, address=args.address, resume=bool(args.resume))
    except StudyFailed as err:
        print(f"mocoray study: {err}", file=sys.stderr)
        return 1
    if res.interrupted:
        return 130
    print(f"study folder: {res.study_dir}\nMLflow study run: {res.run_id} at {res.tracking_uri}")
    for kind, path in res.best_configs.items():
        print(f"best by {kind}: {path}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from ..tracking.ui import UiError, serve

    try:
        return serve(args.tracking_uri, args.host, args.port, args.experiment)
    except UiError as err:
        print(f"mocoray ui: {err}", file=sys.stderr)
        return 2


def _cmd_export(args: argparse.Namespace) -> int:
    from ..config import TrackingConfig
    from ..config.linear import EncoderConfig
    from ..encoders import backbone_state_dict, export_backbone, resolve_encoder, weights_path
    from ..tracking.artifacts import is_artifact_uri

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
        from ..detection.detectron2 import save_detectron2

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

    from ..tracking.client import resolve_tracking_uri
    from ..tracking.registry import register_encoder

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
    from ..data.parquet import write_parquet_shards

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
