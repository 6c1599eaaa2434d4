"""On-disk datasets (ImageFolder, Parquet shards, CIFAR, STL-10) from small files generated in tmp_path."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mocoray.config import DataConfig
from mocoray.data import CorruptImageError, DatasetNotFoundError, SkipCorrupt, collate_batch
from mocoray.data.base import Resized
from mocoray.data.external import ImageFolderFS, external_splits, stl10_unlabeled
from mocoray.data.parquet import convert_image_folder, write_parquet_shards


def _write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)  # format from the suffix: PNG or JPEG


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """ImageNet layout: train has classes cat, dog, eel; val has only dog and eel."""
    root = tmp_path / "imagenet"
    for i, (split, cls, name) in enumerate(
        [
            ("train", "cat", "a.png"),
            ("train", "cat", "b.jpg"),
            ("train", "dog", "a.png"),
            ("train", "eel", "a.jpeg"),
            ("train", "eel", "b.png"),
            ("val", "dog", "v.png"),
            ("val", "eel", "w.jpg"),
        ]
    ):
        _write_image(root / split / cls / name, seed=i, size=(12 + i, 10))
    return root


def test_imagefolder_labels_come_from_sorted_train_folders_and_val_reuses_them(image_root: Path) -> None:
    train, val, num_classes = external_splits(DataConfig(name="imagefolder", root=str(image_root)))
    assert num_classes == 3 and train.classes == ["cat", "dog", "eel"]
    assert train.labels.tolist() == [0, 0, 1, 2, 2]
    assert val.classes == train.classes and val.labels.tolist() == [1, 2]  # not [0, 1]: train's index
    img, label = train[3]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (15, 10) and label == 2
    assert np.array_equal(_pixels(img), _pixels(Image.open(image_root / "train" / "eel" / "a.jpeg")))


def test_imagefolder_val_root_and_unknown_val_class(image_root: Path, tmp_path: Path) -> None:
    _, val, _ = external_splits(
        DataConfig(name="imagefolder", root=str(image_root / "train"), val_root=str(image_root / "val"))
    )
    assert val.labels.tolist() == [1, 2]
    _write_image(image_root / "val" / "fox" / "x.png", seed=9)
    with pytest.raises(ValueError, match="fox"):
        external_splits(DataConfig(name="imagefolder", root=str(image_root)))


def test_corrupt_image_raises_from_dataset_and_is_skipped_and_counted(image_root: Path) -> None:
    bad = image_root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    (image_root / "train" / "dog" / "README.txt").write_text("not an image")
    train, _, _ = external_splits(DataConfig(name="imagefolder", root=str(image_root)))
    assert len(train) == 6 and train.ignored_files == 1
    corrupt = train.paths.index(str(bad))
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        train[corrupt]

    loader = DataLoader(Resized(SkipCorrupt(train), 16), batch_size=len(train), collate_fn=collate_batch)
    images, labels, skipped = next(iter(loader))
    assert skipped == 1
    assert images.shape == (len(train), 3, 16, 16) and images.dtype == torch.uint8 and labels.shape == (6,)


def test_each_corrupt_file_is_counted_once_and_warned_about_once(tmp_path: Path, caplog) -> None:
    """66 files, 6 corrupt: a run of 3 adjacent ones, a run of 2 and a single one. Serving every item once
    (an epoch) counts 6, not 3+2+1 + 2+1 + 1 = 10; a second pass (the next kNN extraction) warns no more."""
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        for i in range(33):
            _write_image(root / cls / f"{i:02d}.png", seed=i + (cls == "b") * 100)
    corrupt = [root / "a" / "04.png", root / "a" / "05.png", root / "a" / "06.png",
               root / "b" / "10.png", root / "b" / "11.png", root / "b" / "20.png"]
    for path in corrupt:
        path.write_bytes(b"not an image")
    dataset = ImageFolderFS(fsspec.filesystem("file"), str(root))
    assert len(dataset) == 66
    caplog.set_level("WARNING", logger="mocoray.data.base")
    for _ in range(2):  # e.g. two kNN passes, each through a new loader over the same files
        loader = DataLoader(Resized(SkipCorrupt(dataset), 8), batch_size=22, collate_fn=collate_batch)
        assert sum(skipped for _, _, skipped in loader) == 6
    warned = [r.getMessage() for r in caplog.records if "skipping corrupt image" in r.getMessage()]
    assert sorted(w.split(": ")[1] for w in warned) == sorted(str(p) for p in corrupt)


@pytest.fixture
def memory_url():
    url = f"memory://mocoray-test-{uuid.uuid4().hex}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_parquet_round_trip_keeps_images_labels_and_pixels(
    where: str, image_root: Path, tmp_path: Path, memory_url: str
) -> None:
    out = str(tmp_path / "shards") if where == "local" else memory_url
    train_shards = write_parquet_shards(str(image_root), out, images_per_shard=2, split="train")
    val_shards = write_parquet_shards(str(image_root), out, images_per_shard=2, split="val")
    assert len(train_shards) == 3 and len(val_shards) == 1
    assert all(s.startswith("memory://") for s in train_shards) == (where == "memory")

    train, val, num_classes = external_splits(DataConfig(name="parquet", root=out))
    source_train, source_val, _ = external_splits(DataConfig(name="imagefolder", root=str(image_root)))
    assert num_classes == 3 and train.classes == ["cat", "dog", "eel"]
    for got, source in ((train, source_train), (val, source_val)):
        assert len(got) == len(source)
        assert got.labels.tolist() == source.labels.tolist()
        for i in range(len(got)):
            assert np.array_equal(_pixels(got[i][0]), _pixels(source[i][0]))

    schema = pq.read_schema(fsspec.open(train_shards[0], "rb").open())
    assert schema.field("image").type == pa.binary() and schema.field("label").type == pa.int32()
    assert schema.field("path").type == pa.string()


def test_conversion_skips_and_reports_unreadable_files(image_root: Path, tmp_path: Path) -> None:
    (image_root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    (image_root / "train" / "cat" / "notes.txt").write_text("hello")
    report = convert_image_folder(str(image_root), str(tmp_path / "out"), split="train")
    assert report.images == 5 and len(report.shards) == 1
    assert [Path(p).name for p in report.not_images] == ["notes.txt"]
    assert len(report.undecodable) == 1 and "broken.png" in report.undecodable[0]
    with pytest.raises(FileExistsError):
        convert_image_folder(str(image_root), str(tmp_path / "out"), split="train")


def test_parquet_huggingface_struct_column_glob_root_and_missing_labels(tmp_path: Path) -> None:
    _write_image(tmp_path / "src.png", seed=1)
    good = (tmp_path / "src.png").read_bytes()
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    unlabelled = pa.table({"image": pa.array([{"bytes": good, "path": "x.png"}] * 2, type=struct)})
    labelled = pa.table(
        {"image": pa.array([{"bytes": good, "path": "a"}, {"bytes": b"garbage", "path": "b"}], type=struct), "label": [0, 4]}
    )
    (tmp_path / "data").mkdir()
    pq.write_table(unlabelled, tmp_path / "data" / "part-0.parquet")
    pq.write_table(labelled, tmp_path / "val.parquet")

    train, val, num_classes = external_splits(
        DataConfig(name="parquet", root=str(tmp_path / "data" / "*.parquet"), val_root=str(tmp_path / "val.parquet"))
    )
    assert len(train) == 2 and train.labels.tolist() == [-1, -1] and num_classes == 5
    assert np.array_equal(_pixels(train[1][0]), _pixels(Image.open(tmp_path / "src.png")))
    with pytest.raises(CorruptImageError, match=r"val\.parquet row 1"):
        val[1]


def _pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


@pytest.mark.parametrize("root_is_batches_folder", [False, True])
def test_cifar10_from_python_batches(tmp_path: Path, root_is_batches_folder: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = 3 if name == "test_batch" else 4
        batches[name] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        _pickle(folder / name, batches[name])
    _pickle(folder / "batches.meta", {b"label_names": [f"c{i}" for i in range(10)]})

    root = folder if root_is_batches_folder else tmp_path
    train, test, num_classes = external_splits(DataConfig(name="cifar10", root=str(root)))
    assert num_classes == 10 and train.classes[3] == "c3"
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert train.images.dtype == torch.uint8
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    first = batches["data_batch_1"][b"data"][0]
    assert train.images[0, 1, 0, :].tolist() == first[1024:1056].tolist()  # green plane, top row


def test_stl10_binary_layout_is_column_major(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for s, n in [("train", 2), ("test", 1), ("unlabeled", 3)]}
    for split, x in images.items():
        (folder / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())  # stored W-major
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))
    (folder / "test_y.bin").write_bytes(bytes([5]))

    train, test, num_classes = external_splits(DataConfig(name="stl10", root=str(tmp_path)))
    assert num_classes == 10 and train.labels.tolist() == [0, 9] and test.labels.tolist() == [4]
    assert torch.equal(train.images, torch.from_numpy(images["train"]))
    unlabeled = stl10_unlabeled(str(tmp_path))
    assert torch.equal(unlabeled.images, torch.from_numpy(images["unlabeled"]))
    assert unlabeled.labels.tolist() == [-1, -1, -1]
    # pretraining uses unlabeled + train; the kNN bank stays the labelled train split
    from mocoray.data import build_pretrain_data

    data = build_pretrain_data(DataConfig(name="stl10", root=str(tmp_path), image_size=96))
    assert len(data.train) == 5 and len(data.knn_bank) == 2 and len(data.knn_val) == 1


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "imagefolder", "parquet"])
def test_missing_root_names_the_path_and_the_field(tmp_path: Path, name: str) -> None:
    missing = str(tmp_path / "no" / "such" / "dir")
    with pytest.raises(DatasetNotFoundError) as err:
        external_splits(DataConfig(name=name, root=missing))
    assert missing in str(err.value) and "data.root" in str(err.value)


def test_missing_val_root_and_empty_folders_are_clear_errors(image_root: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="data.val_root") as err:
        external_splits(DataConfig(name="imagefolder", root=str(image_root), val_root=missing))
    assert missing in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no Parquet shards"):
        external_splits(DataConfig(name="parquet", root=str(tmp_path / "empty")))
    with pytest.raises(DatasetNotFoundError, match="no class sub-folders"):
        ImageFolderFS(fsspec.filesystem("file"), str(tmp_path / "empty"))
