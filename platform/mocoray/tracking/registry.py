"""Encoders in the MLflow Model Registry: register a pretraining run's `encoder/` artifact as a model
version (aliases, downstream results as tags), and resolve `models:/NAME/VERSION` or `models:/NAME@ALIAS`.

A version's source is the run's artifact folder `runs:/<run id>/encoder` (a torchvision state_dict and
`encoder.json`), not an MLflow-flavoured model: `mlflow.pytorch.log_model` would write the pt2 export
format, which our loaders (and `torch.load(weights_only=True)`) do not read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .. import storage
from .artifacts import BACKBONE_FILE, ENCODER_ARTIFACT, encoder_info, encoder_uri, log_encoder
from .client import client, run_lineage
from .compare import downstream_results

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))/?$")
PRETRAIN_RUN_VERSION_TAG = "mocoray.pretrain_run_id"
ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass
class RegisteredEncoder:
    """One model version of an encoder."""

    name: str
    version: str
    run_id: str | None
    source: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The version's immutable URI (an alias may move; this does not)."""
        return f"models:/{self.name}/{self.version}"


def _registered(mv) -> RegisteredEncoder:
    return RegisteredEncoder(mv.name, str(mv.version), mv.run_id, mv.source, list(mv.aliases or []), dict(mv.tags or {}))


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/NAME/3' -> (NAME, '3', None); 'models:/NAME@champion' -> (NAME, None, 'champion')."""
    m = MODEL_URI.match(uri)
    if not m:
        raise ValueError(f"{uri!r} is not a model version URI: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return m.group("name"), m.group("version"), m.group("alias")


def model_version(tracking_uri: str, model_uri: str) -> RegisteredEncoder:
    """The version a models:/ URI names now (an alias is resolved once, here); LookupError naming what exists."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(model_uri)
    c = client(tracking_uri)
    try:
        mv = c.get_model_version(name, version) if version else c.get_model_version_by_alias(name, alias)
    except MlflowException:
        try:
            model = c.get_registered_model(name)
        except MlflowException:
            raise LookupError(f"{model_uri}: no registered model {name!r} at {tracking_uri}") from None
        versions = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
        known = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
        raise LookupError(f"{model_uri}: registered model {name!r} has versions {versions} and aliases {known}") from None
    return _registered(mv)


def download_uri(tracking_uri: str, model_uri: str) -> str:
    """Where a model version's files are stored (mlflow.artifacts would look a models:/ URI up in the
    process-wide default registry, not in `tracking_uri`)."""
    version = model_version(tracking_uri, model_uri)
    return client(tracking_uri).get_model_version_download_uri(version.name, version.version)


def result_tags(results: dict[str, float]) -> dict[str, str]:
    """Downstream results as version tags, so the registry page shows them."""
    return {name: f"{value:.4f}" for name, value in results.items()}


def _ensure_encoder_artifact(tracking_uri: str, run_id: str, lineage: dict) -> None:
    """Log the run's encoder/ artifact from its exported backbone when the run has none yet (pretraining
    ran with tracking.log_backbone off) and the file is reachable from here."""
    c = client(tracking_uri)
    if any(f.path == f"{ENCODER_ARTIFACT}/{BACKBONE_FILE}" for f in c.list_artifacts(run_id, ENCODER_ARTIFACT)):
        return
    backbone = lineage["backbone"]
    if not backbone or not storage.exists(backbone):
        raise ValueError(f"run {run_id} has no {ENCODER_ARTIFACT}/ artifact (it ran with tracking.log_backbone="
                         f"false?) and its exported backbone {backbone or '(none)'} is not reachable from here; "
                         "register it from a machine that reaches that path")
    params = lineage["params"]
    info = encoder_info(params["model.arch"], params.get("model.cifar_stem") == "True", run_id, lineage["checkpoint"])
    log_encoder(tracking_uri, run_id, backbone, info)


def _description(run_id: str, lineage: dict, results: dict[str, float]) -> str:
    p = lineage["params"]
    text = (f"MoCo {p.get('moco.version', '?')} {p.get('model.arch', '?')} encoder from pretraining run `{run_id}` "
            f"({lineage['run_name']}): K={p.get('moco.queue_size')}, m={p.get('moco.momentum')}, "
            f"tau={p.get('moco.temperature')}, {p.get('optim.epochs')} epochs on {p.get('data.name')}.")
    if results:
        text += " " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()) + "."
    return text


def register_encoder(tracking_uri: str, run_id: str, name: str, aliases: Sequence[str] = (),
                     description: str | None = None) -> RegisteredEncoder:
    """A new version of registered model `name` (created if new) from pretraining run `run_id`'s encoder,
    tagged with its downstream results and its run; `aliases` (e.g. champion) point at it."""
    from mlflow.exceptions import MlflowException

    bad = [a for a in aliases if not ALIAS_NAME.match(a) or re.fullmatch(r"[vV]\d+|latest", a)]
    if bad:
        raise ValueError(f"alias {bad[0]!r}: an alias is a name such as champion (letters, digits, _ and -; "
                         "not 'latest' nor v<number>, which MLflow reserves)")
    lineage = run_lineage(tracking_uri, run_id)
    if lineage["job"] != "pretrain":
        raise ValueError(f"MLflow run {run_id} is a {lineage['job'] or 'non-mocoray'} run; only pretraining runs "
                         "(tag mocoray.job=pretrain) have an encoder to register")
    _ensure_encoder_artifact(tracking_uri, run_id, lineage)
    c = client(tracking_uri)
    try:
        c.create_registered_model(name, description="MoCo encoders (torchvision state_dicts) registered by mocoray")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    results = downstream_results(tracking_uri, run_id)
    tags = {PRETRAIN_RUN_VERSION_TAG: run_id, "mocoray.arch": lineage["params"].get("model.arch", ""),
            **result_tags(results)}
    mv = c.create_model_version(name, encoder_uri(run_id), run_id=run_id, tags=tags,
                                description=description or _description(run_id, lineage, results))
    for alias in aliases:
        c.set_registered_model_alias(name, alias, mv.version)
    out = _registered(mv)
    out.aliases = list(aliases)
    return out


def tag_versions_with_results(tracking_uri: str, run_id: str) -> int:
    """Refresh the result tags of every model version made from `run_id` (after a new downstream run);
    returns how many versions there are."""
    c = client(tracking_uri)
    versions = c.search_model_versions(f"run_id = '{run_id}'")
    if versions:
        tags = result_tags(downstream_results(tracking_uri, run_id))
        for mv in versions:
            for key, value in tags.items():
                c.set_model_version_tag(mv.name, mv.version, key, value)
    return len(versions)
