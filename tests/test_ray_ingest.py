"""`data.loader: ray`: Ray Data ingest on a two-node cluster (training on one node, decoding on an `ingest` node),
its equal and disjoint shards in the torch path's order, corrupt files, resume, learning; the order and views of
an epoch against the epoch alone; and the views it makes against the torch path's."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXPERIMENTS, recorded_batches
from local_cluster import Driver, LocalCluster
from mocoray.config import load_config
from mocoray.core.augment import BatchAugment, moco_spec, two_view_transform
from mocoray.data.base import TensorImages, to_uint8_tensor
from mocoray.data.ray_ingest import ingest_dataset, make_two_views, start_clock
from mocoray.data.sampler import GlobalBatchSampler

TRAIN_IMAGES, CORRUPT, VAL_IMAGES = 2045, 3, 256  # 2048 files: 16 global batches of 128 (enough to learn)
STEPS = (TRAIN_IMAGES + CORRUPT) // 128  # per epoch
EPOCHS = 3  # then resumed for one more


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
    """The README demo's recipe on the digit folder with `data.loader: ray`, ingest pinned to the ingest node,
    kNN and logistic regression after the last epoch of each run (epochs EPOCHS and EPOCHS + 1: nothing reads the
    others', and the monitor draws nothing from the training RNG, so it changes no step):
    EPOCHS epochs with a mid-epoch checkpoint every STEPS + 1 steps, the first after the first step of the second
    epoch, where a worker dies (the group restarts from that mid-epoch checkpoint); then resumed at the last epoch
    boundary for one more epoch. Every step's sample ids are recorded."""
    cluster, ingest = ingest_cluster
    tmp = tmp_path_factory.mktemp("ingest-run")
    overrides = [f"{k}={v}" for k, v in {
        "data.name": "imagefolder", "data.root": digit_folder, "data.loader": "ray",
        "data.ingest.num_cpus": 1, "data.ingest.resources": "{ingest: 1}", "run.num_workers": 2,
        "run.cpus_per_worker": 2, "run.name": "ray-ingest", "run.storage_path": tmp / "runs",
        "tracking.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "optim.epochs": EPOCHS, "knn.every": EPOCHS + 1,
        "knn.logreg": True, "run.checkpoint_every_steps": STEPS + 1, "run.max_failures": 1}.items()]
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


def test_ray_ingest_runs_its_map_tasks_on_the_ingest_node_and_training_elsewhere(ingest_run):
    assert ingest_run["first"]["status"] == "completed" and ingest_run["resumed"]["status"] == "completed"
    cluster, ingest = ingest_run["cluster"], ingest_run["ingest"]
    maps = [t for t in cluster.tasks() if "MapBatches(views)" in t["name"]]
    assert maps, sorted({t["name"] for t in cluster.tasks()})
    assert {t["node_id"] for t in maps} == {ingest.node_id}
    trainers = [a for a in cluster._state_api("actors") if a["class_name"] == "RayTrainWorker"]
    assert trainers and ingest.node_id not in {a["node_id"] for a in trainers}
    clocks = [a for a in cluster._state_api("actors") if a["class_name"] == "PassClock"]
    assert len(clocks) == 2 and {a["node_id"] for a in clocks} == {cluster.head.node_id}  # the drivers' node


def _torch_path_batches(epoch: int) -> dict[int, dict[int, list[int]]]:
    """{step: {rank: sample ids}} the torch path's sampler serves in `epoch` (run.seed 0, 2 ranks, batch 128)."""
    out: dict[int, dict[int, list[int]]] = {}
    for rank in (0, 1):
        sampler = GlobalBatchSampler(TRAIN_IMAGES + CORRUPT, 128, rank, 2, seed=0)
        sampler.set_epoch(epoch)
        ids = list(sampler)
        for step in range(len(ids) // 64):
            out.setdefault(step, {})[rank] = ids[step * 64:(step + 1) * 64]
    return out


def test_each_epoch_trains_the_torch_paths_batches_on_both_ranks(ingest_run):
    """Every step of an uninterrupted epoch: equal, disjoint rank batches, and exactly the torch path's (the
    epoch's order is `epoch_permutation(seed, epoch)` on both paths; data.ingest.batch_rows 64 is the per-rank
    batch, so each rank's batch is one ingest chunk and the split alternates them in order)."""
    steps = recorded_batches(ingest_run["tmp"] / "first")
    per_epoch = (TRAIN_IMAGES + CORRUPT) // 128
    assert sorted(steps) == [(e, s) for e in range(EPOCHS) for s in range(per_epoch)]
    for ranks in steps.values():
        assert sorted(ranks) == [0, 1] and len(ranks[0]) == len(ranks[1]) == 64
        assert not set(ranks[0]) & set(ranks[1])
    expected = _torch_path_batches(0)
    assert {s: steps[(0, s)] for s in range(per_epoch)} == expected
    seen = [i for s in range(per_epoch) for i in steps[(0, s)][0] + steps[(0, s)][1]]
    assert len(seen) == len(set(seen)) == TRAIN_IMAGES + CORRUPT  # every file once in an uninterrupted epoch


def test_a_restart_from_a_mid_epoch_checkpoint_trains_the_rest_of_the_epoch_exactly(ingest_run):
    """What docs/design.md states: a worker group restarted from the checkpoint after step s of an S-step epoch
    trains steps s..S-1 of that epoch's order, on the ranks an uninterrupted run would (no image twice, none
    left out), as the torch path does."""
    assert (ingest_run["tmp"] / "crashed").exists()
    steps = recorded_batches(ingest_run["tmp"] / "first")
    per_epoch = (TRAIN_IMAGES + CORRUPT) // 128
    assert {s: steps[(1, s)] for s in range(per_epoch)} == _torch_path_batches(1)
    trained = [i for s in range(per_epoch) for r in (0, 1) for i in steps[(1, s)][r]]
    assert len(trained) == len(set(trained)) == TRAIN_IMAGES + CORRUPT


def test_corrupt_files_are_counted_once_each_per_epoch(ingest_run, digit_folder):
    """Every corrupt file once in each epoch trained from its start; the epoch restarted after its step 1 counts
    those in the steps it trained, as the torch path does."""
    from mocoray.data.external import imagefolder_splits

    train, _val, _ = imagefolder_splits(str(digit_folder))
    broken = {i for i, path in enumerate(train.paths) if "broken_" in str(path)}
    assert len(broken) == CORRUPT
    steps = recorded_batches(ingest_run["tmp"] / "first")
    restarted = {i for (e, s), ranks in steps.items() if e == 1 and s >= 1 for r in (0, 1) for i in ranks[r]}
    res = ingest_run["resumed"]
    client = mlflow.MlflowClient(res["tracking_uri"])
    history = client.get_metric_history(res["mlflow_run_id"], "corrupt_images_skipped")
    expected = [(e + 1, len(broken & restarted) if e == 1 else CORRUPT) for e in range(EPOCHS + 1)]
    assert sorted((m.step, m.value) for m in history) == expected


def test_resume_at_an_epoch_boundary_continues_with_the_next_epoch(ingest_run):
    """As on the torch path: the resumed run restores the epoch-EPOCHS checkpoint and trains only the next epoch,
    on that epoch's batches, its steps numbered on from there, and MLflow gets each epoch once."""
    steps = recorded_batches(ingest_run["tmp"] / "resumed")
    per_epoch = (TRAIN_IMAGES + CORRUPT) // 128
    assert sorted(steps) == [(EPOCHS, s) for s in range(per_epoch)]
    # the batches an uninterrupted run trains in that epoch, though this attempt's first pass is its first
    assert {s: steps[(EPOCHS, s)] for s in range(per_epoch)} == _torch_path_batches(EPOCHS)
    res = ingest_run["resumed"]
    assert res["metrics"]["epoch"] == EPOCHS + 1
    client = mlflow.MlflowClient(res["tracking_uri"])
    assert [m.step for m in client.get_metric_history(res["mlflow_run_id"], "loss")] == list(range(1, EPOCHS + 2))
    meta = json.loads(Path(res["checkpoint"], "meta.json").read_text())
    assert meta["metrics"]["epoch"] == EPOCHS + 1


def test_ray_ingest_pretraining_learns_like_the_torch_path(ingest_run):
    """The run above (the README demo's recipe on 2,048 files, EPOCHS epochs then one more resumed, a worker
    restart on the way) against its encoder at random init with recalibrated BN statistics, by logistic
    regression on frozen features of the 256 val images (`knn.logreg`).

    Measured: logreg 0.6914 vs 0.4297 at init (+0.262). The same recipe and folder for 4 uninterrupted epochs on
    one node: ray loader +0.246 (0.676 vs 0.430), torch loader +0.230 (0.660 vs 0.430), the two paths alike. kNN
    does not move yet in 4 epochs (here -0.090; ray -0.070, torch -0.086 on one node), as with the v3 recipe cut
    to 4 epochs (tests/test_pretrain.py), so it is printed, not asserted. The floors sit 0.05 below the lowest of
    the three measurements, for another CPU's floating-point order.
    """
    m = ingest_run["resumed"]["metrics"]
    print(f"\nray ingest, {EPOCHS + 1} epochs: logreg {m['logreg_top1']:.4f} vs random init "
          f"{m['logreg_top1_init']:.4f} ({m['logreg_margin']:+.4f}); kNN {m['knn_top1']:.4f} vs "
          f"{m['knn_top1_init']:.4f} ({m['knn_margin']:+.4f})")
    assert m["logreg_margin"] >= 0.18 and m["logreg_top1"] >= 0.61


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


def _passes(dataset: TensorImages, plan: list[tuple[int, int]], clock) -> list[dict[int, list[tuple[int, np.ndarray]]]]:
    """Each pass of `plan` ((epoch, first step) each) through a fresh ingest pipeline split across 2 ranks as
    Ray Train splits it (equal, in order), its passes set on `clock`: {rank: [(sample id, its first view)]} per pass.
    Its map tasks take 2 CPUs each, so that at most two ingest processes start (each imports torch)."""
    import threading

    from ray import get as ray_get

    ds = ingest_dataset(dataset, 192, moco_spec("v2", 8), "device", 5, 2, {}, 16, 32, clock)
    ds.context.execution_options.preserve_order = True
    splits = ds.streaming_split(2, equal=True)
    out = []
    for epoch, start_step in plan:
        ray_get(clock.set.remote(epoch, start_step))
        got: dict[int, list] = {}

        def read(rank: int, got: dict[int, list] = got) -> None:  # ranks read at once: a pass waits for all
            got[rank] = [(int(i), q) for b in splits[rank].iter_batches(batch_size=16, batch_format="numpy")
                         for i, q in zip(b["id"], b["view_q"], strict=True)]

        threads = [threading.Thread(target=read, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out.append(got)
    return out


def test_an_epochs_order_and_views_depend_on_the_run_seed_and_the_epoch_only(ray_session):
    """A resumed run's first pass (its execution 0) serves epoch 2 exactly as an uninterrupted run's third pass
    does: the same samples on the same ranks in the same order, the torch path's (`GlobalBatchSampler`, global
    batch 32 over 2 ranks, one 16-row ingest chunk per rank batch), and the same views, bit for bit; a pass
    started at step 2 serves the rest of it."""
    images = torch.randint(0, 256, (200, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    dataset = TensorImages(images, torch.zeros(200, dtype=torch.long), 1)
    clock = start_clock()  # one for both pipelines: each pass sets it before it starts
    run = _passes(dataset, [(0, 0), (1, 0), (2, 0)], clock)
    resumed, mid = _passes(dataset, [(2, 0), (2, 2)], clock)
    for rank in (0, 1):
        sampler = GlobalBatchSampler(200, 32, rank, 2, seed=5)
        sampler.set_epoch(2)
        assert [i for i, _ in run[2][rank]] == [i for i, _ in resumed[rank]] == list(sampler)
        assert [i for i, _ in mid[rank]] == list(sampler)[2 * 16:]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(run[2][rank], resumed[rank], strict=True))
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(run[2][rank][2 * 16:], mid[rank], strict=True))
    assert [i for i, _ in run[0][0]] != [i for i, _ in run[1][0]]


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
