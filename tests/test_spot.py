"""Spot-ready clusters, on a real multi-node Ray on 127.0.0.1: preemption, elastic workers, S3, tracking outages.

One cluster for the module (a head and worker nodes, one CPU each, `local_cluster.LocalCluster`) and an S3
server (moto) whose endpoint and dummy credentials are in the nodes' environment, as an instance role's
would be. Each run is driven from its own process (`cluster_driver.py`), so the test session's local Ray
is never disturbed. Timing is made deterministic with `Faults`: the ranks pause after chosen epochs until
the test has done its deed (stopped a server, drained a node, ...).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from conftest import (
    MlflowServer,
    free_port,
    recorded_batches,
    tiny_pretrain_overrides,
    tiny_v3_overrides,
    wait_until,
)
from local_cluster import Driver, LocalCluster
from mocoray.config import load_config
from mocoray.data.sampler import epoch_permutation
from mocoray.jobs.preemption import RECORD_FILE, read_record
from mocoray.tracking.outbox import UNSENT_FILE

ACCESS_KEY, SECRET_KEY = "AKIAMOCORAYSPOTTEST1", "mocoray-spot-test-secret-do-not-write"
BUCKET = "mocoray-spot"


@pytest.fixture(scope="module")
def s3_env():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_env):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), env=s3_env).start()
    try:
        c.add_node()
        yield c
    finally:
        c.shutdown()


def _overrides(tmp_path: Path, name: str, tiny=tiny_pretrain_overrides, **extra) -> list[str]:
    """Two workers (one per node) of a tiny MoCo (`tiny`: v2's, or `tiny_v3_overrides`); 256 images / global
    batch 16 = 16 steps per epoch. kNN after the last epoch only: no test here reads it, and it changes no step."""
    return tiny(tmp_path, name, **{
        "run.num_workers": 2, "run.cpus_per_worker": 1, "data.synthetic_images": 256, "optim.batch_size": 16,
        "optim.epochs": 3, "run.keep_checkpoints": 20, "knn.max_bank": 256, "knn.every": 1000, **extra})


class Pauses:
    """The test's side of `Faults(pause_after_epochs=..., pause_dir=...)`."""

    def __init__(self, root: Path, epochs: list[int]) -> None:
        self.dir, self.epochs = root, epochs
        root.mkdir(parents=True, exist_ok=True)

    def faults(self, **extra) -> dict:
        return {"pause_after_epochs": self.epochs, "pause_dir": str(self.dir), **extra}

    def wait(self, epoch: int, driver: Driver, timeout: float = 600) -> None:
        def paused() -> bool:
            assert driver.proc.poll() is None, f"the run ended early: {driver.log.read_text()[-4000:]}"
            return (self.dir / f"paused_{epoch}").exists()

        wait_until(paused, timeout, lambda: f"no pause after epoch {epoch}: {driver.log.read_text()[-4000:]}")

    def go(self, epoch: int) -> None:
        (self.dir / f"go_{epoch}").touch()


def _client(tmp_path: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _values_in_time_order(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step))]


def _final(checkpoint: str) -> dict:
    d = Path(checkpoint)
    return {"model": torch.load(d / "model.pt", weights_only=True),
            "optimizer": torch.load(d / "optimizer.pt", weights_only=True),
            "train": torch.load(d / "train_state.pt", weights_only=True)}


def test_a_node_drained_for_preemption_mid_epoch_costs_no_epoch_and_the_run_resumes_exactly(cluster, tmp_path):
    cluster.ensure_workers(2)  # head + 2 nodes for 2 workers: one node is the spare a reclaim moves to
    # MoCo v3: its exact resume (predictor, AdamW moments, cosine momentum of the step) checked mid-epoch, the
    # hardest case; the drain lands in epoch 2, after epoch 1's pause
    two_epochs = {"optim.epochs": 2, "moco.momentum_schedule": "cosine"}
    reference = Driver(cluster, tmp_path / "reference.log",
                       _overrides(tmp_path, "uninterrupted", tiny_v3_overrides, **two_epochs)).result()

    pauses = Pauses(tmp_path / "pauses", [1])
    run = Driver(cluster, tmp_path / "preempted.log",
                 _overrides(tmp_path, "preempted", tiny_v3_overrides, **{
                     "run.preemption_check_steps": 1, "run.max_failures": 0, **two_epochs}),
                 faults=pauses.faults(step_delay_s=0.5))  # epoch 2 outlasts the drain's deadline
    pauses.wait(1, run)
    (node, *_) = cluster.training_nodes()
    t_drain = time.time()
    cluster.drain_for_preemption(node, deadline_s=12)
    time.sleep(1.0)  # Ray Train's watcher polls drains every 0.5 s here
    pauses.go(1)
    res = run.result()
    t_done = time.time()

    assert res["status"] == "completed" and res["metrics"]["epoch"] == 2
    assert cluster.state(node) != "ALIVE"  # the drained node went away (Ray ends it once its work is gone)
    # it resumed from the last checkpoint written after the notice, mid-epoch, and lost less than an epoch
    (event,) = read_record(str(Path(res["run_dir"]) / RECORD_FILE))
    assert event["notice_step"] > 16 and all("_step_" in name for name in event["checkpoints"])
    assert event["resumed_from"] == event["checkpoints"][-1] and "_step_" in event["resumed_from"]
    assert 0 <= event["steps_lost"] < 16
    print(f"\npreemption: notice at step {event['notice_step']}, checkpoints {event['checkpoints']}, "
          f"{event['steps_lost']} steps lost, resumed {event['resumed_time'] - event['notice_time']:.1f} s after "
          f"the notice on {event['resumed_world_size']} workers; run done {t_done - t_drain:.0f} s after the drain")
    # every epoch once in MLflow, the preemption counted, the world size over time
    client = _client(tmp_path)
    run_id = res["mlflow_run_id"]
    assert _steps(client, run_id, "loss") == [1, 2]
    assert client.get_metric_history(run_id, "preemptions")[-1].value == 1
    assert _values_in_time_order(client, run_id, "world_size") == [2, 2]
    # exact resume: the same steps, weights (predictor included), AdamW state, momentum and epoch losses as the
    # uninterrupted run
    a, b = _final(reference["checkpoint"]), _final(res["checkpoint"])
    assert a["train"]["global_step"] == b["train"]["global_step"] == 2 * 16
    assert any(k.startswith("predictor.") for k in a["model"])  # saved with the model; the key side has none
    assert not any(k.startswith(("encoder_k.predictor", "queue.")) for k in a["model"])
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-6), key
    _assert_same_optimizer_state(a["optimizer"], b["optimizer"])
    ref_run = reference["mlflow_run_id"]
    for key in ("loss", "momentum"):
        ref, got = _values_by_step(client, ref_run, key), _values_by_step(client, run_id, key)
        assert got.keys() == ref.keys() == {1, 2}, key
        assert got == pytest.approx(ref, abs=1e-6), key


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    """Per parameter, the same optimizer state (AdamW: both moments and the step count); relative, as the second
    moments are squared gradients (down to 1e-11 here) that an absolute tolerance would not check."""
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for pid, state in a["state"].items():
        assert state.keys() == b["state"][pid].keys(), pid
        for name, value in state.items():
            torch.testing.assert_close(b["state"][pid][name], value, rtol=1e-5, atol=1e-12, msg=f"{pid} {name}")


def _values_by_step(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_elastic_v3_with_ray_data_ingest_shrinks_when_a_node_dies_and_grows_when_one_comes_back(cluster, tmp_path):
    cluster.ensure_workers(1)
    pauses = Pauses(tmp_path / "pauses", [1, 2])
    batches = tmp_path / "batches"
    batches.mkdir()
    # MoCo v3 fed by Ray Data: a resize restarts the worker group, whose dataset is split again for its size.
    # One worker (0.75 CPU) per node, beside one ingest task (0.25): the head alone must hold both.
    # A global batch of 32 over 128 images, 4 steps per epoch; batch_rows 16 is the per-rank batch on 2 workers,
    # half of it on 1: step s is positions 32s..32s+31 of the epoch's order on either (docs/design.md, Ray Data
    # ingest).
    overrides = _overrides(tmp_path, "elastic", tiny_v3_overrides, **{
        "run.num_workers": "[1, 2]", "run.resize_check_s": 2, "run.max_failures": -1, "run.cpus_per_worker": 0.75,
        "data.loader": "ray", "data.ingest.num_cpus": 0.25, "data.ingest.batch_rows": 16,
        "data.synthetic_images": 128, "optim.batch_size": 32, "run.checkpoint_every_steps": 2})
    run = Driver(cluster, tmp_path / "elastic.log", overrides, faults=pauses.faults(batches_dir=str(batches)))
    pauses.wait(1, run)
    for node in cluster.live_workers():  # no notice: they are just gone; the head's one CPU is left
        cluster.kill(node)
    for node in cluster.workers:
        cluster.wait_dead(node)
    pauses.go(1)
    pauses.wait(2, run)  # epoch 2 ran on the one node left
    cluster.add_node()
    _wait_for_world_size(tmp_path, "elastic", 2, after=1)  # Ray Train grows the group (the paused one ends)
    pauses.go(2)
    res = run.result()

    assert res["status"] == "completed" and res["metrics"]["epoch"] == 3
    client = _client(tmp_path)
    run_id = res["mlflow_run_id"]
    assert client.get_run(run_id).data.params["data.loader"] == "ray"
    assert [t for t in cluster.tasks() if "MapBatches(views)" in t["name"]]  # the ingest's map tasks ran
    sizes = _values_in_time_order(client, run_id, "world_size")
    assert [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]] == [2, 1, 2], sizes
    assert _steps(client, run_id, "loss") == [1, 2, 3]
    # the global batch stayed 32 whatever the world size: the same number of steps, each the epoch's next 32
    # samples of the torch path's order, split across as many ranks as the epoch had
    assert _final(res["checkpoint"])["train"]["global_step"] == 3 * 4
    seed = load_config(None, overrides).run.seed
    trained = recorded_batches(batches)
    for epoch, world in enumerate([2, 1, 2]):
        order = epoch_permutation(128, seed, epoch).tolist()
        for step in range(4):
            ranks = trained[(epoch, step)]
            assert sorted(ranks) == list(range(world)), (epoch, step, sorted(ranks))
            assert [i for r in range(world) for i in ranks[r]] == order[32 * step:32 * (step + 1)], (epoch, step)
    assert {epoch for epoch, _ in trained} == {0, 1, 2} and len(trained) == 3 * 4


def _wait_for_world_size(tmp_path: Path, run_name: str, size: int, after: int, timeout: float = 600) -> None:
    """Until the run's world_size metric has gone from `after` to `size`."""
    client = _client(tmp_path)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                filter_string=f"attributes.run_name = '{run_name}'")

    def sizes() -> list[float]:
        return _values_in_time_order(client, run.info.run_id, "world_size")

    def went_over() -> bool:
        seen = sizes()
        return after in seen and size in seen[seen.index(after):]

    wait_until(went_over, timeout, lambda: f"world size never went from {after} to {size}: {sizes()}")


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def test_checkpoints_resume_on_s3_with_credentials_only_in_the_environment_and_metrics_outlive_a_tracking_outage(
        cluster, s3_env, tmp_path, monkeypatch):
    """A parquet dataset and the run's storage on S3 (credentials only in the environment), tracked by an
    `mlflow server`: one epoch, then resumed for three more, the server stopped after epoch 2 (epoch 3 is logged
    while nobody answers) and started again after epoch 3: every metric arrives once it is back."""
    import fsspec

    from mocoray.data.parquet import write_parquet_shards

    cluster.ensure_workers(1)
    server = MlflowServer(tmp_path, job_execution=False).start()  # started before the credentials are set
    try:
        for key, value in s3_env.items():
            monkeypatch.setenv(key, value)
        fs = fsspec.filesystem("s3")
        fs.mkdir(BUCKET)
        folder = tmp_path / "images"
        for split, n in (("train", 32), ("val", 8)):
            for cls in ("a", "b"):
                (folder / split / cls).mkdir(parents=True)
                for i in range(n):
                    (folder / split / cls / f"{i}.png").write_bytes(_png(i + 50 * (cls == "b")))
            write_parquet_shards(str(folder), f"s3://{BUCKET}/data", images_per_shard=20, split=split)
        overrides = _overrides(tmp_path, "on-s3", **{
            "data.name": "parquet", "data.root": f"s3://{BUCKET}/data", "run.storage_path": f"s3://{BUCKET}/runs",
            "tracking.tracking_uri": server.uri, "optim.epochs": 1})
        first = Driver(cluster, tmp_path / "s3-first.log", overrides).result()
        assert first["checkpoint"] == f"s3://{BUCKET}/runs/on-s3/epoch_0001"

        pauses = Pauses(tmp_path / "pauses", [2, 3])
        run = Driver(cluster, tmp_path / "s3-resumed.log", [*overrides, "optim.epochs=4"], resume=True,
                     faults=pauses.faults())
        pauses.wait(2, run)
        server.stop()  # epoch 3 is logged while nobody answers
        pauses.go(2)
        pauses.wait(3, run)
        unsent = f"{BUCKET}/runs/on-s3/{UNSENT_FILE}"
        assert fs.exists(unsent)  # kept next to the checkpoints, so a restarted worker would find it
        server.start()
        pauses.go(3)
        resumed = run.result()

        assert resumed["status"] == "completed" and resumed["checkpoint"] == f"s3://{BUCKET}/runs/on-s3/epoch_0004"
        assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
        train_state = torch.load(fs.open(f"{BUCKET}/runs/on-s3/epoch_0004/train_state.pt"), weights_only=True)
        assert train_state["epoch"] == 4 and train_state["global_step"] == 4 * 4  # 64 images / 16
        assert fs.exists(f"{BUCKET}/runs/on-s3/backbone.pt")
        # every epoch's metrics once, those logged during the outage included; an outage alone never fails a run
        assert resumed["unsent_metrics"] is None and not fs.exists(unsent)
        client = mlflow.MlflowClient(server.uri)
        run_id = resumed["mlflow_run_id"]
        for key in ("loss", "contrastive_acc", "lr", "preemptions"):
            assert _steps(client, run_id, key) == [1, 2, 3, 4], key
        assert client.get_run(run_id).info.status == "FINISHED"
        # no credential in anything the runs wrote: the bucket, the MLflow store, the driver's output
        written = [fs.cat(path) for path in fs.find(f"{BUCKET}/runs")]
        written += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and folder not in p.parents]
        assert len(written) > 10
        for secret in (ACCESS_KEY, SECRET_KEY):
            assert not any(secret.encode() in blob for blob in written), secret
    finally:
        server.stop()
