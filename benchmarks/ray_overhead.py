"""What running the pretraining loop through Ray Train costs, against the same loop in a plain process.

Same job both ways: `experiments/digits_moco_v2.yaml` with 1 worker of 1 CPU (1 torch thread), its
batch, the same training images (capped by `--max-images` to keep the run short), the same epochs,
the kNN monitor at init and after the last epoch (`--knn-every-epoch`: every epoch, as the
experiment's `knn.every: 1`; the epochs then take ~3x longer) and a checkpoint every epoch; MLflow
tracking off.

* plain: a separate Python process (spawned, no Ray in it) running the worker's loop built from the
  job's own pieces (`jobs/pretrain/`: `build_moco`, `train_loader`, `two_views`, `train_one_epoch`,
  `knn_at_init`, `evaluate_trained`, and `save_training_checkpoint` into a local folder).
* ray: `jobs.pretrain.driver.run_pretrain` on a local Ray started here (`ray.init(num_cpus=2)`; or the
  cluster at `--address`), 1 worker, its unmodified `loop.train_loop_per_worker` (handed to Ray in place of
  the driver's own reference to it); the benchmark only wraps `ray.train.report` in the worker to stamp
  times and to pause there.

Alternating epochs: the two runs take turns, one epoch at a time (ray epoch 1, plain epoch 1, ray
epoch 2, plain epoch 2, ...): after each `ray.train.report` returns, the Ray worker waits until the
plain process has done its epoch of the same number, and the plain process waits for the Ray epoch
before it. So at any moment only one of them trains, and load from other processes on a shared
machine falls on both alike. Ray's background processes keep running throughout. Note that Ray
starts its worker processes at nice 15 (`RAY_worker_niceness`), so on a busy machine they yield to
Ray's own daemons and to everything else at nice 0; `--worker-niceness 0` and `--no-dashboard`
measure what that costs.

Reported, over the steady-state epochs 2..E (epoch 1 also holds warm-up; per-epoch ratios paired
ray epoch e / plain epoch e, then the median):
* epoch time, wall clock: ray = from the worker resuming after report e-1 to report e returning
  (training, kNN, checkpoint, the report barrier and persisting the checkpoint to storage); plain =
  the same work. The overhead `ray / plain - 1` is the headline figure (target <= 10%).
* CPU seconds per epoch: ray = the whole process tree under this driver (worker, Train controller,
  raylet, GCS, dashboard, ...) during the Ray epoch; plain = that process alone. Less sensitive to
  other load than wall time.
* training-only pairs/s (the timed step loop of each epoch, as the job reports it).
* start-up, separately: `ray.init`; from calling `run_pretrain` to the start of the first epoch
  (Train controller, worker process, process group, data, model, initial kNN); the plain process
  from its spawn to the start of its first epoch (interpreter, imports, data, model, initial kNN),
  measured before Ray starts. And the tear-down from the last epoch to `run_pretrain` returning.

`--smoke` (what the tests run): 2 epochs of 2 steps on 64 images, a kNN bank of 64 (not all 4,314 training
images), the same code path and table; with `--address` it joins a running Ray instead of starting one
(ray.init is then only the connection).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

from _bench import (
    REPO,
    ensure_mocoray_importable,
    machine_line,
    median,
    parse_with_smoke,
    table,
    tree_cpu_seconds,
)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local throwaway cluster
ensure_mocoray_importable()

import torch  # noqa: E402

from mocoray.config import PretrainConfig, load_config  # noqa: E402

WAIT_S = 900.0  # give up waiting for the other side after this long


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "experiments" / "digits_moco_v2.yaml"))
    p.add_argument("--epochs", type=int, default=5, help="epochs per run (steady state = epochs 2..)")
    p.add_argument("--max-images", type=int, default=640, help="training images (and kNN bank)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--knn-every-epoch", action="store_true",
                   help="kNN monitor after every epoch (default: at init and after the last epoch only)")
    p.add_argument("--set", action="append", default=[], help="more config overrides, key=value")
    p.add_argument("--worker-niceness", type=int, default=None,
                   help="set RAY_worker_niceness (Ray starts its workers at nice 15 by default) before ray.init")
    p.add_argument("--no-dashboard", action="store_true",
                   help="ray.init(include_dashboard=False): no dashboard and dashboard agent processes")
    p.add_argument("--address", default=None,
                   help="a running Ray cluster to use (default: start a local Ray with 2 CPUs here)")
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders and timing files")
    return parse_with_smoke(p, argv, epochs=2, max_images=64, batch=32, set=["moco.queue_size=32", "knn.max_bank=64"])


def make_config(args: argparse.Namespace, storage: str, name: str) -> PretrainConfig:
    overrides = [
        "run.num_workers=1", "run.cpus_per_worker=1", "run.torch_threads=1", f"run.name={name}",
        f"run.storage_path={storage}", "run.checkpoint_every=1", f"run.keep_checkpoints={args.epochs}",
        "tracking.enabled=false", f"optim.epochs={args.epochs}", f"optim.batch_size={args.batch}",
        f"data.max_images={args.max_images}", f"knn.every={1 if args.knn_every_epoch else 1000}", *args.set,
    ]
    return load_config(args.config, overrides)


# --- small file-based handshake between the driver, the Ray worker and the plain process ---

def write_json(path: str, row: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, path)


def wait_json(path: str) -> dict:
    deadline = time.time() + WAIT_S
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(f"waited {WAIT_S:.0f}s for {path}: the other side of the benchmark is gone")
        time.sleep(0.01)
    with open(path) as f:
        return json.load(f)


def make_paced_loop(gate: str, driver_pid: int):
    """The job's own worker loop, with `ray.train.report` wrapped to stamp times and take turns."""

    def paced_loop(loop_config: dict) -> None:
        import ray.train

        from mocoray.jobs.pretrain import loop

        report = ray.train.report
        write_json(f"{gate}/ray_worker.json", {"nice": os.nice(0), "pid": os.getpid()})
        state = {"epoch": 0, "t": time.time(), "cpu": tree_cpu_seconds(driver_pid)}

        def paced_report(metrics, *args, **kwargs):
            report(metrics, *args, **kwargs)
            now, cpu = time.time(), tree_cpu_seconds(driver_pid)
            state["epoch"] += 1
            e = state["epoch"]
            tree = cpu - state["cpu"] if cpu is not None and state["cpu"] is not None else None
            write_json(f"{gate}/ray_{e}.json", {"t_start": state["t"], "t_end": now, "cpu": tree,
                                                "pairs_per_s": metrics.get("pairs_per_s"),
                                                "epoch_time_s": metrics.get("epoch_time_s")})
            wait_json(f"{gate}/plain_{e}.json")  # the plain process does its epoch e meanwhile
            state.update(t=time.time(), cpu=tree_cpu_seconds(driver_pid))

        ray.train.report = paced_report  # loop.py and state.py look it up at each call
        loop.train_loop_per_worker(loop_config)

    return paced_loop


def plain_process(cfg_dict: dict, gate: str, ckpt_root: str, t_spawn: float) -> None:
    """The worker's loop without Ray (rank 0 of 1), taking turns with the Ray worker epoch by epoch: the steps of
    `loop.train_loop_per_worker` for one worker, with a checkpoint written where Ray's report would take it."""
    from mocoray.checkpoints import save_training_checkpoint
    from mocoray.core.compiled import make_sgd
    from mocoray.core.shuffle_bn import resolve_bn_mode
    from mocoray.data import build_pretrain_data
    from mocoray.jobs.faults import Faults
    from mocoray.jobs.pretrain.loop import build_moco, epoch_metrics, train_one_epoch
    from mocoray.jobs.pretrain.monitor import evaluate_trained, knn_at_init
    from mocoray.jobs.pretrain.state import TrainState
    from mocoray.jobs.pretrain.views import train_loader, two_views

    cfg = PretrainConfig.model_validate(cfg_dict)
    torch.set_num_threads(cfg.run.torch_threads or 1)
    device = torch.device("cpu")
    data = build_pretrain_data(cfg.data)
    bn_mode = resolve_bn_mode(cfg.moco.bn_mode, 1, device.type)
    torch.manual_seed(cfg.run.seed)
    model = build_moco(cfg, bn_mode).to(device)
    optimizer = make_sgd(model.encoder_q.parameters(), cfg.optim.effective_lr, cfg.optim.sgd_momentum,
                         cfg.optim.weight_decay, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    torch.manual_seed(cfg.run.seed * 1000 + 1)
    loader, sampler = train_loader(cfg, data.train, 0, 1)
    views, state, backbone = two_views(cfg), TrainState(), model.encoder_q.backbone

    state.monitor(*knn_at_init(backbone, data, cfg, device, False), init=True)
    write_json(f"{gate}/plain_ready.json", {"startup_s": time.time() - t_spawn})
    for epoch in range(cfg.optim.epochs):
        wait_json(f"{gate}/ray_{epoch + 1}.json")
        t0, c0 = time.time(), time.process_time()
        sampler.set_epoch(epoch, state.step_in_epoch)
        stats = train_one_epoch(model, loader, optimizer, scaler, views, cfg, epoch, state, device, False, 0, Faults())
        state.epoch = epoch + 1
        if state.epoch % cfg.knn.every == 0 or state.epoch == cfg.optim.epochs:
            state.monitor(*evaluate_trained(backbone, data, cfg, device, False))
        metrics = epoch_metrics(state, stats, cfg, time.time() - t0)
        save_training_checkpoint(Path(ckpt_root) / f"epoch_{state.epoch:04d}", rank=0, model_state=model.state_dict(),
                                 optimizer_state=optimizer.state_dict(), scaler_state=scaler.state_dict(),
                                 train_state=vars(state), meta={"config": cfg_dict, "metrics": metrics})
        write_json(f"{gate}/plain_{state.epoch}.json", {
            "t_start": t0, "t_end": time.time(), "cpu": time.process_time() - c0,
            "pairs_per_s": metrics["pairs_per_s"]})


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import _bench
    import ray
    import ray.cloudpickle

    from mocoray.jobs.pretrain import driver

    ray.cloudpickle.register_pickle_by_value(_bench)  # the worker cannot import benchmarks/_bench.py
    torch.set_num_threads(1)  # the driver computes nothing; this only makes the machine line say what the runs use

    work = Path(tempfile.mkdtemp(prefix="mocoray_ray_overhead_"))
    gate = str(work / "gate")
    os.makedirs(gate)
    plain_cfg = make_config(args, str(work / "plain"), "plain")
    ray_cfg = make_config(args, str(work / "ray"), "ray")

    # 1. the plain process starts alone (its start-up is not disturbed by Ray's), then waits for Ray.
    t_spawn = time.time()
    proc = mp.get_context("spawn").Process(
        target=plain_process, args=(plain_cfg.model_dump(mode="json"), gate, str(work / "plain_ckpt"), t_spawn))
    # Ray sets OMP_NUM_THREADS to a worker's CPUs; without it the BLAS under the kNN monitor's logistic
    # regression runs a thread per core in the plain process, and on a busy machine they spin.
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, int(plain_cfg.run.cpus_per_worker)))
    proc.start()
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = omp
    plain_startup = wait_json(f"{gate}/plain_ready.json")["startup_s"]
    print(f"plain process ready: {plain_startup:.1f}s from spawn to first epoch", flush=True)

    # 2. Ray: start, then the job; its worker and the plain process take turns epoch by epoch.
    t = time.time()
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    if args.address:
        ray.init(address=args.address, configure_logging=False, log_to_driver=args.verbose)
    else:
        ray.init(num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=not args.no_dashboard,
                 configure_logging=False, log_to_driver=args.verbose)
    ray_init_s = time.time() - t
    original = driver.train_loop_per_worker
    driver.train_loop_per_worker = make_paced_loop(gate, os.getpid())  # the name run_pretrain hands to Ray
    try:
        t_call = time.time()
        res = driver.run_pretrain(ray_cfg)
        t_done = time.time()
    finally:
        driver.train_loop_per_worker = original
        ray.shutdown()  # with --address: only this driver's connection
        proc.join(timeout=60)
    if res.status != "completed":
        raise SystemExit(f"the Ray run ended with status {res.status!r}")

    E = args.epochs
    worker_nice = wait_json(f"{gate}/ray_worker.json")["nice"]
    ray_rows = [wait_json(f"{gate}/ray_{e}.json") for e in range(1, E + 1)]
    plain_rows = [wait_json(f"{gate}/plain_{e}.json") for e in range(1, E + 1)]
    ray_startup = ray_rows[0]["t_end"] - ray_rows[0]["epoch_time_s"] - t_call
    teardown = t_done - plain_rows[-1]["t_end"]

    def per_epoch(rows: list[dict], key: str) -> list[float]:
        if key == "wall":
            return [r["t_end"] - r["t_start"] for r in rows[1:]]
        return [r[key] for r in rows[1:] if r[key] is not None]

    ray_wall, plain_wall = per_epoch(ray_rows, "wall"), per_epoch(plain_rows, "wall")
    ray_cpu, plain_cpu = per_epoch(ray_rows, "cpu"), per_epoch(plain_rows, "cpu")
    ray_pps, plain_pps = per_epoch(ray_rows, "pairs_per_s"), per_epoch(plain_rows, "pairs_per_s")
    wall_ratios = [a / b for a, b in zip(ray_wall, plain_wall, strict=True)]
    cpu_ratios = [a / b for a, b in zip(ray_cpu, plain_cpu, strict=True)] if ray_cpu and plain_cpu else []
    pps_ratios = [b / a for a, b in zip(ray_pps, plain_pps, strict=True)]  # time ratio ray / plain

    def show(xs: list[float], fmt: str = ".2f") -> str:
        return ", ".join(f"{x:{fmt}}" for x in xs)

    print(f"epochs 2..{E}, wall s   plain: {show(plain_wall)}   ray: {show(ray_wall)}")
    print(f"epochs 2..{E}, CPU s    plain: {show(plain_cpu)}   ray (process tree): {show(ray_cpu)}")
    print(f"epochs 2..{E}, pairs/s  plain: {show(plain_pps, '.0f')}   ray: {show(ray_pps, '.0f')}")
    print()
    print(f"machine: {machine_line()}")
    print(f"{ray_cfg.model.arch}, batch {ray_cfg.optim.batch_size}, K {ray_cfg.moco.queue_size}, {args.max_images} "
          f"images ({args.max_images // ray_cfg.optim.batch_size} steps/epoch), {E} epochs taking turns, kNN "
          f"{'every epoch' if args.knn_every_epoch else 'at init + last epoch'}, checkpoint every epoch, "
          f"1 worker x 1 CPU x 1 thread; Ray worker niceness {worker_nice}, "
          + (f"the cluster at {args.address} (its processes are not this driver's: Ray's CPU s count less)"
             if args.address else f"dashboard {'off' if args.no_dashboard else 'on'}"))

    def pct(ratios: list[float]) -> str:
        return f"{(median(ratios) - 1) * 100:+.1f}% ({(min(ratios) - 1) * 100:+.0f}..{(max(ratios) - 1) * 100:+.0f})" \
            if ratios else "-"

    rows = [
        ["epoch time, steady (s, wall)", f"{median(plain_wall):.2f}", f"{median(ray_wall):.2f}", pct(wall_ratios)],
        ["CPU s per steady epoch", f"{median(plain_cpu):.2f}" if plain_cpu else "-",
         f"{median(ray_cpu):.2f}" if ray_cpu else "-", pct(cpu_ratios)],
        ["train pairs/s, steady (step loop)", f"{median(plain_pps):.1f}", f"{median(ray_pps):.1f}", pct(pps_ratios)],
        ["start-up to first epoch (s)", f"{plain_startup:.1f}", f"{ray_startup:.1f}",
         f"{ray_startup - plain_startup:+.1f}s, and ray.init {ray_init_s:.1f}s"],
        ["tear-down after last epoch (s)", "-", f"{teardown:.1f}", ""],
    ]
    print(table(["", "plain", "ray train", "ray overhead (epoch range)"], rows))
    overhead = median(wall_ratios) - 1
    print(f"steady-state Ray Train overhead: {overhead * 100:+.1f}% wall per epoch (target <= +10%)"
          + (f", {(median(cpu_ratios) - 1) * 100:+.1f}% CPU" if cpu_ratios else ""))
    out = {"machine": machine_line(), "args": vars(args), "overhead_wall": overhead,
           "overhead_cpu": median(cpu_ratios) - 1 if cpu_ratios else None,
           "epoch_wall_s": {"plain": plain_wall, "ray": ray_wall}, "epoch_cpu_s": {"plain": plain_cpu, "ray": ray_cpu},
           "train_pairs_per_s": {"plain": plain_pps, "ray": ray_pps},
           "startup_s": {"plain": plain_startup, "ray": ray_startup, "ray_init": ray_init_s}, "teardown_s": teardown,
           "ray_worker_niceness": worker_nice}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.keep:
        print(f"run folders, checkpoints and timing files kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
