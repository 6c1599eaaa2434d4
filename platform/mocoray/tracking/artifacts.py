"""What makes a tracked run reproducible from the tracking server alone: its recipe, command line,
environment, data (run inputs) and encoder (artifacts); and a local cache for artifacts downloaded back.

Artifacts of every job's run: `config.yaml` (the resolved recipe: `mocoray <job> config.yaml` runs it
again), `command.txt` (the exact command line and its working directory) and `environment.json`
(versions, CUDA and GPU model, world size; written by the job's rank 0, which sees the device). A
pretraining run also has `encoder/` (`backbone.pt`, a torchvision state_dict that loads with
`torch.load(weights_only=True)`, and `encoder.json` saying which architecture it fits): what downstream
jobs and the Model Registry use when the run's checkpoint path is not reachable.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .. import __version__, storage
from ..data.fingerprint import DatasetRecord, digest_of
from .client import ENCODER_TAG, client, safely

CONFIG_ARTIFACT = "config.yaml"
COMMAND_ARTIFACT = "command.txt"
ENVIRONMENT_ARTIFACT = "environment.json"
ENCODER_ARTIFACT = "encoder"  # a folder: BACKBONE_FILE + ENCODER_INFO_FILE
BACKBONE_FILE = "backbone.pt"
ENCODER_INFO_FILE = "encoder.json"
ARTIFACT_SCHEMES = ("runs:/", "models:/")
CACHE_ENV = "MOCORAY_CACHE_DIR"

_command_line: list[str] | None = None


def set_command_line(argv: Sequence[str]) -> None:
    """Record the command this process runs (the CLI calls this with `mocoray` + its arguments)."""
    global _command_line
    _command_line = list(argv)


def command_argv() -> list[str]:
    """The recorded command, else this process's own argv."""
    return list(_command_line if _command_line is not None else sys.argv)


def command_line() -> str:
    return shlex.join(command_argv())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_record(world_size: int | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Versions, platform, CUDA and the GPU model (when this process sees one), and the job's world size."""
    record: dict[str, Any] = {
        "versions": {"mocoray": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     **{p: _version(p) for p in ("torchvision", "ray", "mlflow", "numpy", "pyarrow")}},
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
        "device": str(device) if device is not None else None,
        "cuda": {"built_with": torch.version.cuda, "available": torch.cuda.is_available()},
    }
    if torch.cuda.is_available():
        index = device.index if device is not None and device.type == "cuda" and device.index is not None else 0
        props = torch.cuda.get_device_properties(index)
        record["cuda"].update({"cudnn": torch.backends.cudnn.version(), "device_count": torch.cuda.device_count()})
        record["gpu"] = {"model": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"}
    return record


# ---------------------------------------------------------------------------------------------------
# Logging


def log_text(uri: str, run_id: str, name: str, text: str) -> None:
    """`text` as the artifact `name` (a path inside the run's artifacts, e.g. 'config.yaml')."""
    folder, _, filename = name.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / filename
        path.write_text(text)
        client(uri).log_artifact(run_id, str(path), folder or None)


def log_job_record(uri: str, run_id: str, config_text: str, environment: dict[str, Any] | None = None) -> None:
    """config.yaml, command.txt (+ environment.json when given) on the run (its Source names only the job and
    recipe: `tracking.describe`)."""
    command = command_line()
    log_text(uri, run_id, CONFIG_ARTIFACT, config_text)
    log_text(uri, run_id, COMMAND_ARTIFACT, f"# in {os.getcwd()}\n{command}\n")
    if environment is not None:
        log_text(uri, run_id, ENVIRONMENT_ARTIFACT, json.dumps(environment, indent=2))


def log_environment(uri: str | None, run_id: str | None, world_size: int, device: torch.device) -> None:
    """environment.json as a job's rank 0 sees it (the GPU it trains on); a tracking failure only warns."""
    if uri and run_id:
        record = environment_record(world_size, device)
        safely("logging environment.json", log_text, uri, run_id, ENVIRONMENT_ARTIFACT, json.dumps(record, indent=2))


def log_dataset_inputs(uri: str, run_id: str, records: Sequence[DatasetRecord]) -> None:
    """Each record as a run input (MLflow's dataset inputs, with context 'training' or 'validation')."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for r in records:
        dataset = Dataset(name=r.name, digest=r.digest, source_type=r.source_type,
                          source=json.dumps({"uri": r.source}), profile=json.dumps(r.profile))
        context = "training" if r.split == "train" else "validation"
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    client(uri).log_inputs(run_id, datasets=inputs)


def record_job_start(uri: str | None, run_id: str | None, config_text: str,
                     datasets: Callable[[], Sequence[DatasetRecord]],
                     environment: dict[str, Any] | None = None) -> None:
    """What every job logs when its run opens (nothing without a run): config.yaml, the command line
    (+ environment.json when given) and its dataset inputs. `datasets` is only called when there is a
    run. A tracking failure only warns."""
    if not (uri and run_id):
        return
    safely("logging config.yaml and the command line", log_job_record, uri, run_id, config_text, environment)
    safely("logging the dataset inputs", lambda: log_dataset_inputs(uri, run_id, datasets()))


def encoder_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{ENCODER_ARTIFACT}"


def encoder_info(arch: str, cifar_stem: bool, run_id: str | None, checkpoint: str | None) -> dict[str, Any]:
    """encoder.json: what the backbone fits and where it came from."""
    return {"arch": arch, "cifar_stem": cifar_stem, "format": "torchvision state_dict; torch.load(weights_only=True)",
            "pretrain_run_id": run_id, "checkpoint": checkpoint, "mocoray": __version__}


def log_encoder(uri: str, run_id: str, backbone_path: str, info: dict[str, Any]) -> str:
    """The exported backbone (path or URL) and its `info` (arch, cifar_stem, ...) as the run's `encoder/`
    artifact; tags the run with its URI, which it returns."""
    from mlflow.entities import RunTag

    c = client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / ENCODER_ARTIFACT
        folder.mkdir()
        (folder / BACKBONE_FILE).write_bytes(storage.read_bytes(backbone_path))
        (folder / ENCODER_INFO_FILE).write_text(json.dumps(info, indent=2))
        c.log_artifacts(run_id, str(folder), ENCODER_ARTIFACT)
    c.log_batch(run_id, tags=[RunTag(ENCODER_TAG, encoder_uri(run_id))])
    return encoder_uri(run_id)


def record_encoder(uri: str | None, run_id: str | None, backbone_path: str, info: dict[str, Any]) -> None:
    """`log_encoder` for a job's run (nothing without a run); a tracking failure only warns."""
    if uri and run_id:
        safely("logging the encoder artifact", log_encoder, uri, run_id, backbone_path, info)


# ---------------------------------------------------------------------------------------------------
# Downloading back


def is_artifact_uri(text: str | None) -> bool:
    """A run artifact (runs:/<id>/...) or a registered model version (models:/<name>/<version> or @alias)."""
    return text is not None and text.startswith(ARTIFACT_SCHEMES)


def cache_dir() -> Path:
    """$MOCORAY_CACHE_DIR, else ~/.cache/mocoray."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mocoray")


def download_cached(artifact_uri: str, tracking_uri: str, where: Callable[[], str] | None = None) -> Path:
    """A local copy of an artifact (file or folder), downloaded once per machine and tracking server.

    Only immutable URIs belong here (a run's artifact, a model version by number: never an alias).
    `where` gives the URI to download from when that is not `artifact_uri` itself (a model version's
    storage location; asked only on a cache miss). Downloads land in a temporary folder first and are
    renamed into place, so concurrent workers on one machine never see half a file.
    """
    from mlflow.artifacts import download_artifacts

    target = cache_dir() / "artifacts" / digest_of([tracking_uri, artifact_uri])
    name = artifact_uri.rstrip("/").rsplit("/", 1)[-1]
    if (target / name).exists():
        return target / name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        try:
            downloaded = Path(download_artifacts(artifact_uri=where() if where else artifact_uri,
                                                 dst_path=str(staging / "files"), tracking_uri=tracking_uri))
        except Exception as err:  # MLflow's and the network's many kinds of "not there"
            first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise LookupError(f"{artifact_uri}: could not download it from {tracking_uri}: {first}") from None
        (staging / "done").mkdir()
        downloaded.rename(staging / "done" / name)
        try:
            (staging / "done").rename(target)
        except OSError:  # another worker on this machine got there first: same bytes
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / name
