"""Run records without Ray: dataset digests, the environment record, and encoders in a local SQLite store's
Model Registry (artifacts beside the store, registration, models:/ resolution, clear errors)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from mocoray.config import DataConfig, TrackingConfig
from mocoray.config.linear import EncoderConfig
from mocoray.core.backbones import build_backbone
from mocoray.data.fingerprint import dataset_records
from mocoray.data.parquet import write_parquet_shards
from mocoray.encoders import load_backbone, resolve_encoder
from mocoray.tracking.artifacts import encoder_info, environment_record, log_encoder
from mocoray.tracking.client import BACKBONE_TAG, CHECKPOINT_TAG, JOB_TAG, start_run
from mocoray.tracking.compare import compare_table
from mocoray.tracking.registry import model_version, register_encoder


def _records(**fields) -> dict[str, object]:
    return {r.split: r for r in dataset_records(DataConfig(**fields))}


def _image_folder(root: Path, sizes: dict[str, int]) -> None:
    """root/{train,val}/<class>/<name>.png; `sizes` maps train file names to image widths."""
    for split in ("train", "val"):
        for i, (name, width) in enumerate(sizes.items()):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (width, 8), (i * 40, 0, 0)).save(folder / f"{name}.png")
    (root / "train" / "class0" / "README.txt").write_text("not an image")


def test_folder_digest_follows_file_names_and_sizes_and_counts_only_images(tmp_path):
    _image_folder(tmp_path / "a", {"x": 8, "y": 8, "z": 8})
    _image_folder(tmp_path / "b", {"x": 8, "y": 8, "z": 8})
    _image_folder(tmp_path / "c", {"x": 8, "y": 8, "z": 16})  # one file of another size
    a, b, c = (_records(name="imagefolder", root=str(tmp_path / d)) for d in "abc")
    assert a["train"].num_images == 3 and a["val"].num_images == 3
    assert a["train"].digest == b["train"].digest and a["val"].digest == b["val"].digest
    assert a["train"].digest != c["train"].digest
    assert a["train"].source == str(tmp_path / "a" / "train") and a["train"].source_type == "local"
    capped = _records(name="imagefolder", root=str(tmp_path / "a"), max_images=2)
    assert capped["train"].num_images == 2 and capped["train"].profile["images_available"] == 3
    assert capped["train"].digest != a["train"].digest and capped["val"].digest == a["val"].digest


def test_parquet_digest_reads_shard_footers(tmp_path):
    _image_folder(tmp_path / "imgs", {f"i{k}": 8 for k in range(5)})
    for split in ("train", "val"):
        write_parquet_shards(str(tmp_path / "imgs" / split), str(tmp_path / "pq" / split), images_per_shard=2)
    full = _records(name="parquet", root=str(tmp_path / "pq"))
    assert full["train"].num_images == 5 and full["val"].num_images == 5
    (tmp_path / "imgs" / "train" / "class0" / "i0.png").unlink()
    write_parquet_shards(str(tmp_path / "imgs" / "train"), str(tmp_path / "pq2" / "train"), images_per_shard=2)
    write_parquet_shards(str(tmp_path / "imgs" / "val"), str(tmp_path / "pq2" / "val"), images_per_shard=2)
    fewer = _records(name="parquet", root=str(tmp_path / "pq2"))
    assert fewer["train"].num_images == 4
    assert fewer["train"].digest != full["train"].digest and fewer["val"].digest == full["val"].digest


def test_embedded_sets_digest_their_generator_parameters_and_stl10_counts_from_file_sizes(tmp_path):
    synthetic = _records(name="synthetic", synthetic_images=64)
    assert synthetic["train"].num_images == 64 and synthetic["val"].num_images == 16
    assert synthetic["train"].source_type == "code"
    assert _records(name="synthetic", synthetic_images=64)["train"].digest == synthetic["train"].digest
    assert _records(name="synthetic", synthetic_images=64, image_size=16)["train"].digest != synthetic["train"].digest
    digits = _records(name="scattered-digits")
    assert (digits["train"].num_images, digits["val"].num_images) == (4314, 1077)  # 3 placements of 1438 / 359
    assert _records(name="digits")["train"].digest != digits["train"].digest

    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        (folder / f"{split}_X.bin").write_bytes(bytes(n * 3 * 96 * 96))
        (folder / f"{split}_y.bin").write_bytes(bytes([1] * n))
    (folder / "unlabeled_X.bin").write_bytes(bytes(4 * 3 * 96 * 96))
    stl = _records(name="stl10", root=str(tmp_path))
    assert (stl["train"].num_images, stl["val"].num_images) == (3, 2)
    pretraining = {r.split: r for r in dataset_records(DataConfig(name="stl10", root=str(tmp_path)), pretraining=True)}
    assert pretraining["train"].num_images == 7 and pretraining["train"].digest != stl["train"].digest


def test_environment_record_names_versions_device_and_world_size():
    env = environment_record(world_size=2, device=torch.device("cpu"))
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["mlflow"] == mlflow.__version__
    assert all(env["versions"][p] for p in ("mocoray", "torchvision", "ray", "python"))
    assert env["world_size"] == 2 and env["device"] == "cpu"
    assert ("gpu" in env) == torch.cuda.is_available()


# ------------------------------------------------------------------------------------ SQLite registry


def _pretrain_run(uri: str, tmp_path: Path, name: str, seed: int, log_artifact: bool = True) -> tuple[str, dict]:
    """A pretraining run as `run_pretrain` leaves it: params, tags, an exported backbone (+ its artifact)."""
    torch.manual_seed(seed)
    net, _ = build_backbone("small_resnet")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    run_id = start_run(uri, "registry", name, {"model.arch": "small_resnet", "model.cifar_stem": False,
                                               "moco.queue_size": 64},
                       {JOB_TAG: "pretrain", BACKBONE_TAG: str(path), CHECKPOINT_TAG: str(path)})
    if log_artifact:
        log_encoder(uri, run_id, str(path), encoder_info("small_resnet", False, run_id, str(path)))
    mlflow.MlflowClient(uri).set_terminated(run_id)
    return run_id, state


def test_sqlite_store_keeps_artifacts_beside_it_and_serves_registered_encoders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's own default would put artifacts in ./mlruns of this directory
    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    first, first_state = _pretrain_run(uri, tmp_path, "first", seed=1)
    second, second_state = _pretrain_run(uri, tmp_path, "second", seed=2, log_artifact=False)
    assert (store / "mlartifacts" / "registry").is_dir() and not (tmp_path / "mlruns").exists()

    v1 = register_encoder(uri, first, "digits-enc", ["champion"])
    v2 = register_encoder(uri, second, "digits-enc")  # no artifact yet: logged from its reachable backbone
    assert (v1.version, v2.version) == ("1", "2") and v1.source == f"runs:/{first}/encoder"
    c = mlflow.MlflowClient(uri)
    assert {f.path for f in c.list_artifacts(second, "encoder")} == {"encoder/backbone.pt", "encoder/encoder.json"}
    assert c.get_model_version("digits-enc", "1").tags["mocoray.pretrain_run_id"] == first

    tracking = TrackingConfig(tracking_uri=uri)
    enc = resolve_encoder(EncoderConfig(checkpoint="models:/digits-enc@champion"), tracking)
    assert (enc.source, enc.arch, enc.pretrain_run_id) == ("models:/digits-enc/1", "small_resnet", first)
    c.set_registered_model_alias("digits-enc", "champion", "2")  # the resolved source stays version 1
    for source, expected in ((enc, first_state),
                             (resolve_encoder(EncoderConfig(checkpoint="models:/digits-enc/2"), tracking), second_state)):
        loaded = load_backbone(source)[0].state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)

    rows = {r["run_id"]: r for r in compare_table(uri, "registry").rows}
    assert rows[first]["registered"] == "digits-enc/1" and rows[first]["alias"] == ""
    assert rows[second]["alias"] == "digits-enc@champion"
    assert "registered" in compare_table(uri, "registry").columns


def test_registry_errors_name_what_exists(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = _pretrain_run(uri, tmp_path, "only", seed=0)
    register_encoder(uri, run_id, "enc", ["champion"])
    with pytest.raises(LookupError, match=r"versions \[1\] and aliases @champion -> 1"):
        model_version(uri, "models:/enc@nope")
    with pytest.raises(LookupError, match="no registered model 'other'"):
        model_version(uri, "models:/other/1")
    with pytest.raises(ValueError, match="models:/NAME/VERSION or models:/NAME@ALIAS"):
        model_version(uri, "models:/enc")
    with pytest.raises(ValueError, match="'latest'"):
        register_encoder(uri, run_id, "enc", ["latest"])
    linear = start_run(uri, "registry", "lin", {}, {JOB_TAG: "linear"})
    with pytest.raises(ValueError, match="only pretraining runs"):
        register_encoder(uri, linear, "enc")
    gone, _ = _pretrain_run(uri, tmp_path, "gone", seed=3, log_artifact=False)
    os.remove(tmp_path / "gone.pt")
    with pytest.raises(ValueError, match="no encoder/ artifact.*not reachable"):
        register_encoder(uri, gone, "enc")
