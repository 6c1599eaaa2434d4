"""What the driver checks before Ray starts: a bad address, data that cannot work, malformed input.

Each failure here must come quickly, in the tool's error format, and leave nothing behind: no run
folder (which would block re-running the name) and no MLflow run or store.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port, tiny_pretrain_overrides
from mocoray import __version__
from mocoray.cli import main
from mocoray.config import ConfigError, load_config
from mocoray.data import DatasetNotFoundError
from mocoray.jobs.pretrain.driver import run_pretrain

pytestmark = pytest.mark.no_mlflow_store  # these tests check that a refused run creates nothing


def _nothing_created(tmp_path: Path) -> bool:
    return not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (18, 18), (seed * 37 % 256, seed * 91 % 256, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _image_folder(root: Path, classes: tuple[str, ...], per_class: int) -> Path:
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                (root / split / cls / f"{i}.png").write_bytes(_png(i + 7 * len(cls)))
    return root


def test_unreachable_ray_address_fails_fast_and_creates_nothing(tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    cmd = [sys.executable, "-m", "mocoray.cli", "pretrain", "--address", address,
           *[f"--set={o}" for o in tiny_pretrain_overrides(tmp_path, "bad-address")]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Before the fix Ray retried the GCS for minutes: the timeout turns that hang into a failure. The probe
    # itself fails at once; the limit leaves room for the command's start-up on a loaded CI machine.
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot reach a Ray cluster at {address} (--address)" in out.stderr
    assert "Traceback" not in out.stderr
    assert _nothing_created(tmp_path)


def test_empty_image_folder_is_refused_on_the_driver_and_creates_nothing(tmp_path):
    root = tmp_path / "empty"
    for split in ("train", "val"):
        (root / split / "cat").mkdir(parents=True)  # class folders, but no images
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "empty", **{"data.name": "imagefolder",
                                                                          "data.root": str(root)}))
    with pytest.raises(DatasetNotFoundError, match=f"data.root: no images .* in the class folders of {root}/train"):
        run_pretrain(cfg)
    assert _nothing_created(tmp_path)


@pytest.mark.parametrize("split, field", [("train", "data.root"), ("val", "data.root")])
def test_image_folder_of_only_corrupt_files_is_refused_on_the_driver_and_creates_nothing(tmp_path, split, field):
    root = _image_folder(tmp_path / "folder", ("cat", "dog", "owl"), per_class=20)
    for path in (root / split).rglob("*.png"):
        path.write_bytes(b"not an image at all")
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "corrupt", **{"data.name": "imagefolder",
                                                                            "data.root": str(root)}))
    # 32 tried of 60: spread over the 3 classes, 11 from each (the last class gets the 10 left)
    with pytest.raises(DatasetNotFoundError, match=f"{field}: none of the 32 image files tried in {root / split} "
                                                   r"\(spread over its class folders\) decodes as an image"):
        run_pretrain(cfg)
    assert _nothing_created(tmp_path)


def test_image_folder_with_one_decodable_file_among_corrupt_ones_passes_the_check(tmp_path):
    from mocoray.data.peek import peek

    root = _image_folder(tmp_path / "folder", ("cat", "dog"), per_class=40)
    for path in sorted((root / "train").rglob("*.png"))[:-1]:  # the very last file of the last class decodes
        path.write_bytes(b"garbage")
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "mostly-corrupt", **{"data.name": "imagefolder",
                                                                                   "data.root": str(root)}))
    assert peek(cfg.data, enough=32).images == 40  # counted up to a batch: no error


@pytest.mark.parametrize("extra, images", [({"data.synthetic_images": 16}, 16),
                                           ({"data.synthetic_images": 128, "data.max_images": 20}, 20)])
def test_batch_larger_than_the_dataset_is_refused_on_the_driver(tmp_path, extra, images):
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "big-batch", **extra))  # batch 32
    with pytest.raises(ConfigError, match=f"optim.batch_size=32 is larger than the {images} training images"):
        run_pretrain(cfg)
    assert _nothing_created(tmp_path)


def test_missing_resume_from_checkpoint_is_refused_on_the_driver(tmp_path):
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "from-nowhere"))
    missing = tmp_path / "no-such-run" / "epoch_0003"
    with pytest.raises(ConfigError, match=f"--resume-from: no checkpoint at {missing}"):
        run_pretrain(cfg, resume_from=str(missing))
    assert _nothing_created(tmp_path)


def test_malformed_yaml_is_reported_with_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("model:\n  arch: small_resnet\nmoco: [queue_size: 1\n")
    assert main(["pretrain", str(recipe), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mocoray pretrain: ") and f"{recipe}: not valid YAML" in err and "line 3" in err


def test_malformed_set_value_is_reported_with_the_field(capsys):
    assert main(["pretrain", "--set", "moco.queue_size=[1,", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mocoray pretrain: --set moco.queue_size=[1,: the value is not valid YAML")


def test_storage_path_under_a_regular_file_is_reported_with_the_field(tmp_path, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should be")
    overrides = tiny_pretrain_overrides(tmp_path, "blocked", **{"run.storage_path": str(blocker / "runs")})
    assert main(["pretrain", *[f"--set={o}" for o in overrides]]) == 2
    err = capsys.readouterr().err
    assert f"run.storage_path: {blocker} is a file, not a folder" in err
    assert not (tmp_path / "mlflow.db").exists()


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"mocoray {__version__}"


def test_one_class_dataset_warns_that_knn_and_linear_metrics_mean_nothing(tmp_path):
    from mocoray.jobs.preflight import check_pretrain_inputs

    root = _image_folder(tmp_path / "one-class", ("cat",), 40)
    cfg = load_config(None, tiny_pretrain_overrides(tmp_path, "one-class", **{"data.name": "imagefolder",
                                                                              "data.root": str(root)}))
    warnings = check_pretrain_inputs(cfg, None)
    assert any("1 class" in w and "kNN and linear metrics are meaningless" in w for w in warnings), warnings
    two = _image_folder(tmp_path / "two-classes", ("cat", "dog"), 20)
    assert check_pretrain_inputs(cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": str(two)})}),
                                 None) == []
