"""Where an encoder comes from and how to rebuild it: the one resolver every downstream job and export use.

Sources: an MLflow pretraining run (its final checkpoint; where that path is not reachable, the run's
`encoder/` artifact), a registered model version (`models:/NAME/VERSION`, `models:/NAME@ALIAS`) or a
run's artifact (`runs:/ID/encoder`), a checkpoint directory (its `meta.json` says the architecture), an
exported `backbone.pt`, an official MoCo checkpoint (`module.encoder_q.*` keys and its own `arch` entry),
or random init. Paths may be local or any fsspec URL; artifacts are downloaded once per machine into
the cache (`tracking.artifacts.cache_dir`).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import storage
from .checkpoints import backbone_from_state, load_checkpoint_file, read_meta
from .config.common import TrackingConfig
from .config.linear import EncoderConfig
from .core.backbones import ARCHS, build_backbone
from .tracking.artifacts import BACKBONE_FILE, ENCODER_INFO_FILE, download_cached, is_artifact_uri
from .tracking.client import BACKBONE_TAG, CHECKPOINT_TAG, find_run_by_tag, resolve_tracking_uri, run_lineage
from .tracking.registry import download_uri, model_version

log = logging.getLogger(__name__)
RANDOM_INIT = "random-init"


@dataclass
class EncoderSource:
    """A resolved encoder: where its weights are (None = random init) and how to rebuild its module."""

    source: str | None
    arch: str
    cifar_stem: bool
    pretrain_run_id: str | None = None
    pretrain_experiment: str | None = None
    tracking_uri: str | None = None  # where a runs:/ or models:/ source is downloaded from

    @property
    def label(self) -> str:
        return self.source or RANDOM_INIT


def _downloaded(source: str, tracking_uri: str | None) -> Path:
    """The local copy of an artifact source: the encoder/ folder, or a single file."""
    if tracking_uri is None:
        raise ValueError(f"{source}: a tracking URI is needed to download it")
    where = (lambda: download_uri(tracking_uri, source)) if source.startswith("models:/") else None
    return download_cached(source, tracking_uri, where)


def weights_path(encoder: EncoderSource) -> str:
    """Where the encoder's weights load from on this machine (artifact sources downloaded to the cache)."""
    if not is_artifact_uri(encoder.source):
        return encoder.source  # type: ignore[return-value]
    local = _downloaded(encoder.source, encoder.tracking_uri)  # type: ignore[arg-type]
    return str(local / BACKBONE_FILE if local.is_dir() else local)


def _declared_arch(source: str, tracking_uri: str) -> tuple[str, bool] | None:
    """(arch, cifar_stem) the source says it holds: an encoder artifact's encoder.json, a checkpoint
    directory's meta.json, or the `arch` entry that official MoCo checkpoints carry (they have no CIFAR
    stem); None when it does not say."""
    if is_artifact_uri(source):
        info_file = _downloaded(source, tracking_uri) / ENCODER_INFO_FILE
        if not info_file.is_file():
            return None
        info = json.loads(info_file.read_text())
        return (info["arch"], bool(info.get("cifar_stem", False))) if info.get("arch") in ARCHS else None
    if storage.is_dir(source):
        if not storage.exists(storage.join(source, "meta.json")):
            return None
        model = read_meta(source).get("config", {}).get("model", {})
        return (model["arch"], bool(model.get("cifar_stem", False))) if "arch" in model else None
    state = load_checkpoint_file(source)
    arch = state.get("arch") if isinstance(state, dict) else None
    return (arch, False) if isinstance(arch, str) and arch in ARCHS else None


def _reachable(path: str) -> bool:
    try:
        return storage.exists(path)
    except Exception:  # a URL whose filesystem or credentials this machine lacks
        return False


def _from_run(run_id: str, tracking_uri: str) -> tuple[str, str, str | None, tuple[str, bool] | None]:
    """(weights, run id, experiment, (arch, cifar_stem) from its params) of a pretraining run: its final
    checkpoint where reachable from here, else its encoder/ artifact."""
    lineage = run_lineage(tracking_uri, run_id)
    if lineage["job"] != "pretrain":
        raise ValueError(f"MLflow run {run_id} is a {lineage['job'] or 'non-mocoray'} run, "
                         "not a pretraining run (tag mocoray.job=pretrain)")
    checkpoint, artifact = lineage["checkpoint"], lineage["encoder_artifact"]
    if not checkpoint and not artifact:
        raise ValueError(f"pretraining run {run_id} ({lineage['run_name']}, {lineage['status']}) has "
                         "no mocoray.checkpoint tag: it has not finished with a checkpoint")
    if checkpoint and _reachable(checkpoint):
        source = checkpoint
    elif artifact:
        log.info("checkpoint %s of run %s is not reachable here: using its artifact %s", checkpoint, run_id, artifact)
        source = artifact
    else:
        raise ValueError(f"pretraining run {run_id}: its checkpoint {checkpoint} is not reachable from this machine "
                         "and the run has no encoder/ artifact (it ran with tracking.log_backbone=false); "
                         "run on a machine that reaches that path, or pass --checkpoint with a copy")
    params = lineage["params"]
    found = (params["model.arch"], params.get("model.cifar_stem", "False") == "True") if "model.arch" in params else None
    return source, lineage["run_id"], lineage["experiment"], found


def _from_artifact(uri: str, tracking_uri: str) -> tuple[str, str | None, str | None]:
    """(immutable source, run id, experiment) of a models:/ or runs:/ URI; an alias is pinned to its version
    here, so every worker loads the same weights even if the alias moves meanwhile."""
    if uri.startswith("models:/"):
        version = model_version(tracking_uri, uri)
        source, run_id = version.uri, version.run_id
    else:
        source, run_id = uri, uri[len("runs:/") :].split("/", 1)[0]
    try:
        experiment = run_lineage(tracking_uri, run_id)["experiment"] if run_id else None
    except LookupError:  # the run was deleted; its registered weights still count
        experiment = None
    return source, run_id, experiment


def _run_of_checkpoint(source: str, tracking_uri: str) -> tuple[str | None, str | None]:
    """(run id, experiment) of the tracked run that wrote `source`, so a checkpoint keeps its lineage."""
    try:
        run_id = find_run_by_tag(tracking_uri, CHECKPOINT_TAG, source) or find_run_by_tag(
            tracking_uri, BACKBONE_TAG, source)
        return run_id, run_lineage(tracking_uri, run_id)["experiment"] if run_id else None
    except Exception as err:  # lineage is a bonus here; the checkpoint itself is what counts
        log.warning("could not look up the run of %s in MLflow: %s", source, err)
        return None, None


def resolve_encoder(enc: EncoderConfig, tracking: TrackingConfig) -> EncoderSource:
    """Where the weights are and which architecture they fit, from the run / checkpoint / config.

    A pretraining run is looked up in the configured tracking store; a checkpoint path is looked up
    there too (when tracking is on), so that a checkpoint of a tracked run keeps its lineage.
    """
    if enc.random_init:
        return EncoderSource(None, enc.arch, bool(enc.cifar_stem))  # type: ignore[arg-type]
    tracking_uri = resolve_tracking_uri(tracking.tracking_uri)
    found: tuple[str, bool] | None = None
    if enc.pretrain_run:
        source, run_id, experiment, found = _from_run(enc.pretrain_run, tracking_uri)
    elif is_artifact_uri(enc.checkpoint):
        source, run_id, experiment = _from_artifact(enc.checkpoint, tracking_uri)  # type: ignore[arg-type]
    else:
        source = storage.absolute(enc.checkpoint)  # type: ignore[arg-type]
        if not storage.exists(source):
            raise FileNotFoundError(f"encoder.checkpoint: nothing at {source}")
        run_id, experiment = _run_of_checkpoint(source, tracking_uri) if tracking.enabled else (None, None)
    found = _declared_arch(source, tracking_uri) or found
    if found is None and enc.arch is None:
        raise ValueError(f"encoder.arch is required for {source}: the file does not say which architecture it "
                         "holds (no meta.json, no 'arch' entry); e.g. --arch resnet50")
    arch = enc.arch or found[0]  # type: ignore[index]
    cifar_stem = enc.cifar_stem if enc.cifar_stem is not None else (found[1] if found else False)
    if found and (arch, cifar_stem) != found:
        raise ValueError(f"encoder.arch={arch} / cifar_stem={cifar_stem} contradict {source}, which holds a "
                         f"{found[0]} with cifar_stem={found[1]}; leave them unset to use the checkpoint's")
    return EncoderSource(source, arch, cifar_stem, run_id, experiment,
                         tracking_uri if is_artifact_uri(source) else None)


def load_backbone(encoder: EncoderSource, seed: int = 0) -> tuple[nn.Module, int]:
    """The backbone with the encoder's weights (strictly: every tensor present, none left over).

    A random-init backbone is drawn from `seed`, so every worker builds the same one.
    """
    torch.manual_seed(seed)
    backbone, feat_dim = build_backbone(encoder.arch, encoder.cifar_stem)
    if encoder.source is not None:
        state = backbone_state_dict(weights_path(encoder))
        own = backbone.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        # same names, other shapes: a different width of the same family (small_resnet vs small_resnet_slim)
        resized = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or resized:
            raise ValueError(
                f"{encoder.source} does not fit a {encoder.arch} backbone (cifar_stem={encoder.cifar_stem}): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes {resized[:5]}; set "
                "encoder.arch / encoder.cifar_stem to the architecture it was trained with"
            )
        backbone.load_state_dict(state)
    return backbone, feat_dim


def backbone_state_dict(source: str) -> dict[str, torch.Tensor]:
    """Backbone weights from a checkpoint directory, an exported file, or an official MoCo file."""
    if not storage.exists(source):
        raise FileNotFoundError(f"no checkpoint at {source}")
    state = load_checkpoint_file(source)
    if not isinstance(state, dict):
        raise ValueError(f"{source}: expected a state_dict, found {type(state).__name__}")
    picked = backbone_from_state(state)
    if not picked:
        raise ValueError(f"{source}: no backbone weights found (keys start with {sorted(state)[:3]})")
    return picked


def export_backbone(source: str, out_path: str) -> dict[str, torch.Tensor]:
    """Write an encoder's backbone as a plain state_dict (torchvision key names for ResNets) at `out_path`."""
    state = backbone_state_dict(source)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    storage.write_bytes(out_path, buffer.getvalue())
    return state
