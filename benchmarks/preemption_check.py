"""What asking Ray Train for a preemption notice costs, against the MoCo training step it sits between.

The pretraining loop calls `ray.train.get_preemption_info()` every `run.preemption_check_steps` steps
(a collective: rank 0's answer is broadcast through Ray Train's synchronisation actor). Here, on a
local Ray, 2 workers of 1 CPU each alternate, round after round: `--steps` MoCo steps (small_resnet,
DDP, shuffle BN across both workers, random 32 px views, the job's own `build_moco` + `train_step`),
then `--steps` checks. Reported: median ms per step, median ms per check, and what a check every 1 and
every 10 steps adds to the step time.

`--smoke` (what the tests run): 2 rounds of 1 step at batch 4, the same code path and lines; `--address`
runs it on a running Ray instead of a local one started here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _bench import ensure_mocoray_importable, machine_line, parse_with_smoke

ensure_mocoray_importable()


def worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from mocoray.config import load_config
    from mocoray.core.moco import train_step
    from mocoray.jobs.pretrain.loop import build_moco

    torch.set_num_threads(1)
    cfg = load_config(None, [f"model.arch={config['arch']}", f"moco.queue_size={config['queue']}",
                             f"optim.batch_size={2 * config['batch']}", "run.num_workers=2"])
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(build_moco(cfg, "shuffle"), move_to_device=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    views = [torch.randn(config["batch"], 3, 32, 32) for _ in range(2)]
    step_ms, check_ms = [], []
    for _ in range(config["rounds"]):
        t0 = time.perf_counter()
        for _ in range(config["steps"]):
            train_step(model, views[0], views[1], optimizer)
        step_ms.append((time.perf_counter() - t0) * 1000 / config["steps"])
        t0 = time.perf_counter()
        for _ in range(config["steps"]):
            ray.train.get_preemption_info()
        check_ms.append((time.perf_counter() - t0) * 1000 / config["steps"])
    if ray.train.get_context().get_world_rank() == 0:  # Ray keeps only metrics reported with a checkpoint
        Path(config["out"]).write_text(json.dumps({"step_ms": statistics.median(step_ms[1:]),
                                                   "check_ms": statistics.median(check_ms[1:])}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="small_resnet")
    p.add_argument("--batch", type=int, default=32, help="per worker")
    p.add_argument("--queue", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=6, help="the first is warm-up and left out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    p.add_argument("--json", default=None)
    args = parse_with_smoke(p, argv, batch=4, queue=64, rounds=2, steps=1)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local throwaway cluster
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mocoray.jobs.runtime import init_ray

    init_ray(args.address)  # else a local Ray on 127.0.0.1, as the jobs start one
    out = Path(tempfile.mkdtemp()) / "figures.json"
    trainer = TorchTrainer(worker, train_loop_config={**vars(args), "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name=f"preemption_check_{os.getpid()}",
                                                          storage_path=str(out.parent)))
    trainer.fit()
    ray.shutdown()  # with --address: only this driver's connection
    m = json.loads(out.read_text())
    shutil.rmtree(out.parent, ignore_errors=True)  # Ray Train's run folder too
    step, check = m["step_ms"], m["check_ms"]
    print(machine_line())
    print(f"2 workers x 1 CPU, {args.arch}, batch {args.batch} per worker, K {args.queue}; medians of "
          f"{args.rounds - 1} rounds of {args.steps}")
    print(f"MoCo step (reference)            {step:8.2f} ms")
    print(f"get_preemption_info (collective) {check:8.2f} ms")
    for every in (1, 10):
        print(f"check every {every:2d} steps adds        {100 * check / every / step:7.2f} % to a step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"step_ms": step, "check_ms": check, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
