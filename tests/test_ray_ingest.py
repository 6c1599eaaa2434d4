"""`data.loader: ray`: Ray Data ingest on a two-node cluster (training on one node, decoding on an `ingest` node),
its equal and disjoint shards, corrupt files, resume, learning; and the views it makes against the torch path's."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXPERIMENTS
from local_cluster import Driver, LocalCluster
from mocoray.config import load_config
from mocoray.core.augment import BatchAugment, moco_spec, two_view_transform
from mocoray.data.base import TensorImages, to_uint8_tensor
from mocoray.data.ray_ingest import make_two_views

TRAIN_IMAGES, CORRUPT, VAL_IMAGES = 1021, 3, 256  # 1024 files: 8 global batches of 128
EPOCHS = 2  # then resumed for one more


def _write_folder(root: Path, split: TensorImages, count: int, corrupt: int = 0) -> None:
    for i in range(count):
        folder = root / str(int(split.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    for i in range(corrupt):
        (root / str(i) / f"broken_{i}.png").write_bytes(b"\x89PNG not really" * 8)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    """Scattered digits as an image folder (PNG files), with CORRUPT undecodable files among the training images."""
    from mocoray.data.digits import scattered_digits

    train, val = scattered_digits()
    root = tmp_path_factory.mktemp("digits-folder")
    _write_folder(root / "train", train, TRAIN_IMAGES, CORRUPT)
    _write_folder(root / "val", val, VAL_IMAGES)
    return root


@pytest.fixture(scope="module")
def ingest_cluster(tmp_path_factory):
    """A head and a worker node for the two training workers (2 CPUs each, what one worker asks for) and an ingest
    node with 1 CPU (too few for a training worker) and the custom resource `ingest`."""
    c = LocalCluster(tmp_path_factory.mktemp("ingest-cluster"), env={}).start(num_cpus=2)
    try:
        c.add_node(num_cpus=2)
        ingest = c.add_node(num_cpus=1, resources={"ingest": 1})
        yield c, ingest
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def ingest_run(ingest_cluster, digit_folder, tmp_path_factory):
    """The README demo's recipe on the digit folder with `data.loader: ray`, ingest pinned to the ingest node:
    EPOCHS epochs with a checkpoint after every step, in which a worker dies in the second epoch after its first
    step (the group restarts from that mid-epoch checkpoint); then resumed at the last epoch boundary for one
    more epoch. Every step's sample ids are recorded."""
    cluster, ingest = ingest_cluster
    tmp = tmp_path_factory.mktemp("ingest-run")
    overrides = [f"{k}={v}" for k, v in {
        "data.name": "imagefolder", "data.root": digit_folder, "data.loader": "ray",
        "data.ingest.num_cpus": 1, "data.ingest.resources": "{ingest: 1}", "run.num_workers": 2,
        "run.cpus_per_worker": 2, "run.name": "ray-ingest", "run.storage_path": tmp / "runs",
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "optim.epochs": EPOCHS, "knn.every": 1,
        "knn.logreg": False, "run.checkpoint_every_steps": 1, "run.max_failures": 1}.items()]
    recipe = str(EXPERIMENTS / "digits_moco_v2.yaml")
    crash = {"crash_at_epoch": 1, "crash_rank": 1, "crash_marker": str(tmp / "crashed")}
    first = Driver(cluster, tmp / "first.log", overrides, {"batches_dir": str(tmp / "first"), **crash}, recipe=recipe)
    (tmp / "first").mkdir()
    res_first = first.result()
    (tmp / "resumed").mkdir()
    resumed = Driver(cluster, tmp / "resumed.log", [*overrides, f"optim.epochs={EPOCHS + 1}"],
                     {"batches_dir": str(tmp / "resumed")}, resume=True, recipe=recipe)
    res = resumed.result()
    return {"first": res_first, "resumed": res, "tmp": tmp, "cluster": cluster, "ingest": ingest}


def _batches(folder: Path) -> dict[tuple[int, int], dict[int, list[int]]]:
    """{(epoch, step): {rank: sample ids}} from the `Faults.batches_dir` records."""
    steps: dict[tuple[int, int], dict[int, list[int]]] = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps.setdefault((rec["epoch"], rec["step"]), {})[rec["rank"]] = rec["keys"]
    return steps


def test_ray_ingest_runs_its_map_tasks_on_the_ingest_node_and_training_elsewhere(ingest_run):
    assert ingest_run["first"]["status"] == "completed" and ingest_run["resumed"]["status"] == "completed"
    cluster, ingest = ingest_run["cluster"], ingest_run["ingest"]
    maps = [t for t in cluster.tasks() if t["name"].startswith("MapBatches(views)")]
    assert maps, sorted({t["name"] for t in cluster.tasks()})
    assert {t["node_id"] for t in maps} == {ingest.node_id}
    trainers = [a for a in cluster._state_api("actors") if a["class_name"] == "RayTrainWorker"]
    assert trainers and ingest.node_id not in {a["node_id"] for a in trainers}


def test_both_ranks_see_equal_disjoint_batches_every_step(ingest_run):
    steps = _batches(ingest_run["tmp"] / "first")
    per_epoch = (TRAIN_IMAGES + CORRUPT) // 128
    assert sorted(steps) == [(e, s) for e in range(EPOCHS) for s in range(per_epoch)]
    for ranks in steps.values():
        assert sorted(ranks) == [0, 1] and len(ranks[0]) == len(ranks[1]) == 64
        assert not set(ranks[0]) & set(ranks[1])
    seen = [i for s in range(per_epoch) for i in steps[(0, s)][0] + steps[(0, s)][1]]
    assert len(seen) == len(set(seen)) == TRAIN_IMAGES + CORRUPT  # every file once in an uninterrupted epoch
    orders = [[i for s in range(per_epoch) for i in steps[(e, s)][0]] for e in range(EPOCHS)]
    assert orders[0] != orders[1]  # a fresh shuffle each epoch


def test_a_restart_from_a_mid_epoch_checkpoint_trains_the_rest_of_the_epoch_on_a_fresh_pass(ingest_run):
    """What docs/design.md states: a worker group restarted from the checkpoint after step s of an S-step epoch
    trains steps s..S-1 on the first batches of a new shuffle. The epoch keeps S steps of whole batches, but
    images of steps 0..s-1 can come again and exactly as many others are left out of the epoch."""
    assert (ingest_run["tmp"] / "crashed").exists()
    steps = _batches(ingest_run["tmp"] / "first")
    per_epoch = (TRAIN_IMAGES + CORRUPT) // 128
    before = {i for r in (0, 1) for i in steps[(1, 0)][r]}
    after = [i for s in range(1, per_epoch) for r in (0, 1) for i in steps[(1, s)][r]]
    assert len(after) == len(set(after)) == (per_epoch - 1) * 128
    repeated = before & set(after)
    left_out = TRAIN_IMAGES + CORRUPT - len(before | set(after))
    print(f"\nmid-epoch restart after step 1 of {per_epoch}: {len(repeated)} images repeated, {left_out} left out")
    assert len(repeated) == left_out > 0


def test_corrupt_files_are_counted_once_each_per_epoch(ingest_run):
    res = ingest_run["resumed"]
    client = mlflow.MlflowClient(res["tracking_uri"])
    history = client.get_metric_history(res["mlflow_run_id"], "corrupt_images_skipped")
    assert sorted((m.step, m.value) for m in history) == [(e, CORRUPT) for e in range(1, EPOCHS + 2)]


def test_resume_at_an_epoch_boundary_continues_with_the_next_epoch(ingest_run):
    """As on the torch path: the resumed run restores the epoch-EPOCHS checkpoint and trains only the next epoch,
    its steps numbered on from there, and MLflow gets each epoch once."""
    steps = _batches(ingest_run["tmp"] / "resumed")
    per_epoch = (TRAIN_IMAGES + CORRUPT) // 128
    assert sorted(steps) == [(EPOCHS, s) for s in range(per_epoch)]
    res = ingest_run["resumed"]
    assert res["metrics"]["epoch"] == EPOCHS + 1
    client = mlflow.MlflowClient(res["tracking_uri"])
    assert [m.step for m in client.get_metric_history(res["mlflow_run_id"], "loss")] == list(range(1, EPOCHS + 2))
    meta = json.loads(Path(res["checkpoint"], "meta.json").read_text())
    assert meta["metrics"]["epoch"] == EPOCHS + 1


# ------------------------------------------------------------------- the views, against the torch path's


def _view_statistics(views: torch.Tensor) -> dict:
    return {"mean": float(views.mean()), "std": float(views.std()), "channel_means": views.mean(dim=(0, 2, 3)).tolist()}


@pytest.mark.parametrize("augment", ["device", "loader"])
def test_ray_and_torch_paths_make_views_with_the_same_statistics(augment):
    """The same 256 images through `make_two_views` (the ingest tasks' function) and through the torch path's
    own augmentation (`BatchAugment` on resized images, or `two_view_transform` per image)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 3, 40, 48), dtype=torch.uint8, generator=gen)
    images[:, :, 10:30, 12:36] = images[:, :, 10:30, 12:36] // 2  # some structure for crops to find
    dataset = TensorImages(images, torch.zeros(256, dtype=torch.long), 1)
    spec = moco_spec("v2", 32)
    ray_views = make_two_views(dataset, np.arange(256), spec, augment, run_seed=7)
    ray_q = torch.from_numpy(ray_views["view_q"])
    torch.manual_seed(1)
    if augment == "device":
        resized = torch.stack([to_uint8_tensor(im, 32) for im in images])
        torch_q, _ = BatchAugment(spec).two_views(resized)
    else:
        from torchvision.transforms.functional import to_pil_image

        transform = two_view_transform(spec)
        torch_q = torch.stack([transform(to_pil_image(im))[0] for im in images])
    assert ray_q.shape == torch_q.shape == (256, 3, 32, 32)
    assert ray_views["replaced"].sum() == 0
    ours, theirs = _view_statistics(ray_q), _view_statistics(torch_q)
    assert ours["mean"] == pytest.approx(theirs["mean"], abs=0.05)
    assert ours["std"] == pytest.approx(theirs["std"], rel=0.05)
    assert ours["channel_means"] == pytest.approx(theirs["channel_means"], abs=0.06)
    assert not torch.equal(ray_q, torch.from_numpy(ray_views["view_k"]))  # two different views


def test_ingest_counts_each_corrupt_file_once_and_serves_its_neighbour(tmp_path):
    from mocoray.data.external import imagefolder_splits

    img = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(6):
            img.save(tmp_path / split / "a" / f"{i}.png")
    (tmp_path / "train" / "a" / "1b.png").write_bytes(b"broken")
    (tmp_path / "train" / "a" / "1c.png").write_bytes(b"broken too")
    train, _val, _ = imagefolder_splits(str(tmp_path))
    out = make_two_views(train, np.arange(len(train)), moco_spec("v2", 8), "device", run_seed=0)
    assert len(train) == 8 and out["replaced"].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # 1b, 1c sort after 1
    assert out["view_q"].shape == (8, 3, 8, 8)


def test_missing_folder_is_refused_before_training_with_ray_ingest(tmp_path):
    from mocoray.data import DatasetNotFoundError
    from mocoray.jobs.pretrain.driver import run_pretrain

    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'nowhere'}", "data.loader=ray",
                             f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"])
    with pytest.raises(DatasetNotFoundError, match="data.root: .*nowhere does not exist"):
        run_pretrain(cfg)
    assert not (tmp_path / "runs").exists()


def test_parquet_without_an_image_column_is_refused_before_training_with_ray_ingest(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mocoray.jobs.pretrain.driver import run_pretrain

    for split in ("train", "val"):
        (tmp_path / "shards" / split).mkdir(parents=True)
        pq.write_table(pa.table({"picture": [b"x"] * 40, "label": [0] * 40}),
                       tmp_path / "shards" / split / "part-0.parquet")
    cfg = load_config(None, ["data.name=parquet", f"data.root={tmp_path / 'shards'}", "data.loader=ray",
                             "optim.batch_size=8", f"run.storage_path={tmp_path / 'runs'}", "tracking.enabled=false"])
    with pytest.raises(ValueError, match="data.root: Parquet shard .*part-0.parquet has no 'image' column"):
        run_pretrain(cfg)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, expected", [
    (["data.loader=spark"], ["data.loader='spark'", "'torch' or 'ray'"]),
    (["data.ingest.resources={CPU: 1}"], ["data.ingest.resources", "'CPU' is not a custom resource",
                                         "data.ingest.num_cpus"]),
    (["data.ingest.resources={ingest: 0}"], ["data.ingest.resources.ingest=0", "positive"]),
    (["data.ingest.num_cpus=0"], ["data.ingest.num_cpus=0", "greater than 0"]),
    (["data.loader=ray", "data.name=imagefolder", "data.root=/data", "data.decode=gpu"],
     ["data.loader='ray'", "data.decode='cpu'"]),
])
def test_bad_ingest_settings_name_the_field_and_what_is_allowed(override, expected):
    from mocoray.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    for text in expected:
        assert text in str(err.value)


def test_ingest_settings_default_to_the_torch_loader_and_take_custom_resources():
    assert load_config(None, []).data.loader == "torch"
    cfg = load_config(None, ["data.loader=ray", "data.ingest.resources={ingest: 0.01}", "data.ingest.num_cpus=2"])
    assert cfg.data.ingest.resources == {"ingest": 0.01} and cfg.data.ingest.num_cpus == 2
