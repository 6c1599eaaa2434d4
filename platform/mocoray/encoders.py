"""Where an encoder comes from and how to rebuild it: the one resolver every downstream job and export use.

Sources: an MLflow pretraining run (its final checkpoint), a checkpoint directory (its `meta.json` says the
architecture), an exported `backbone.pt`, an official MoCo checkpoint (`module.encoder_q.*` keys and its own
`arch` entry), or random init. Paths may be local or any fsspec URL.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import storage
from .checkpoints import backbone_from_state, load_checkpoint_file, read_meta
from .config.common import TrackingConfig
from .config.linear import EncoderConfig
from .core.backbones import ARCHS, build_backbone
from .tracking import BACKBONE_TAG, CHECKPOINT_TAG, find_run_by_tag, resolve_tracking_uri, run_lineage

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

    @property
    def label(self) -> str:
        return self.source or RANDOM_INIT


def _declared_arch(source: str) -> tuple[str, bool] | None:
    """(arch, cifar_stem) the source says it holds: a checkpoint directory's meta.json, or the `arch` entry
    that official MoCo checkpoints carry (they have no CIFAR stem); None when it does not say."""
    if storage.is_dir(source):
        if not storage.exists(storage.join(source, "meta.json")):
            return None
        model = read_meta(source).get("config", {}).get("model", {})
        return (model["arch"], bool(model.get("cifar_stem", False))) if "arch" in model else None
    state = load_checkpoint_file(source)
    arch = state.get("arch") if isinstance(state, dict) else None
    return (arch, False) if isinstance(arch, str) and arch in ARCHS else None


def _from_run(run_id: str, tracking_uri: str) -> tuple[str, str, str | None, tuple[str, bool] | None]:
    """(checkpoint, run id, experiment, (arch, cifar_stem) from its params) of a pretraining run."""
    lineage = run_lineage(tracking_uri, run_id)
    if lineage["job"] != "pretrain":
        raise ValueError(f"MLflow run {run_id} is a {lineage['job'] or 'non-mocoray'} run, "
                         "not a pretraining run (tag mocoray.job=pretrain)")
    if not lineage["checkpoint"]:
        raise ValueError(f"pretraining run {run_id} ({lineage['run_name']}, {lineage['status']}) has "
                         "no mocoray.checkpoint tag: it has not finished with a checkpoint")
    params = lineage["params"]
    found = (params["model.arch"], params.get("model.cifar_stem", "False") == "True") if "model.arch" in params else None
    return lineage["checkpoint"], lineage["run_id"], lineage["experiment"], found


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
    else:
        source = storage.absolute(enc.checkpoint)  # type: ignore[arg-type]
        if not storage.exists(source):
            raise FileNotFoundError(f"encoder.checkpoint: nothing at {source}")
        run_id, experiment = _run_of_checkpoint(source, tracking_uri) if tracking.enabled else (None, None)
    found = _declared_arch(source) or found
    if found is None and enc.arch is None:
        raise ValueError(f"encoder.arch is required for {source}: the file does not say which architecture it "
                         "holds (no meta.json, no 'arch' entry); e.g. --arch resnet50")
    arch = enc.arch or found[0]  # type: ignore[index]
    cifar_stem = enc.cifar_stem if enc.cifar_stem is not None else (found[1] if found else False)
    if found and (arch, cifar_stem) != found:
        raise ValueError(f"encoder.arch={arch} / cifar_stem={cifar_stem} contradict {source}, which holds a "
                         f"{found[0]} with cifar_stem={found[1]}; leave them unset to use the checkpoint's")
    return EncoderSource(source, arch, cifar_stem, run_id, experiment)


def load_backbone(encoder: EncoderSource, seed: int = 0) -> tuple[nn.Module, int]:
    """The backbone with the encoder's weights (strictly: every tensor present, none left over).

    A random-init backbone is drawn from `seed`, so every worker builds the same one.
    """
    torch.manual_seed(seed)
    backbone, feat_dim = build_backbone(encoder.arch, encoder.cifar_stem)
    if encoder.source is not None:
        state = backbone_state_dict(encoder.source)
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{encoder.source} does not fit a {encoder.arch} backbone (cifar_stem={encoder.cifar_stem}): "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; set encoder.arch / "
                "encoder.cifar_stem to the architecture it was trained with"
            )
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
