import subprocess
import sys

import pytest
import yaml

from conftest import EXPERIMENTS
from mocoray.config import ConfigError, PretrainConfig, flatten, load_config


@pytest.mark.parametrize(
    "override, expected",
    [
        ("moco.momentum=1.5", ["moco.momentum=1.5", "less than 1"]),
        ("moco.queue_size=0", ["moco.queue_size=0", "greater than or equal to 1"]),
        ("moco.version=v4", ["moco.version='v4'", "'v1', 'v2' or 'v3'"]),
        ("moco.qeue_size=10", ["moco.qeue_size", "unknown field", "queue_size"]),
        ("moco.bn_mode=shufle", ["moco.bn_mode='shufle'", "'shuffle'", "'split'", "'sync'", "'none'"]),
        ("model.arch=resnet9", ["model.arch='resnet9'", "small_resnet"]),
        ("optim.lr=-1", ["optim.lr=-1", "greater than 0"]),
        ("modle.arch=resnet18", ["modle", "unknown field", "model"]),
    ],
)
def test_bad_values_name_the_field_the_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for text in expected:
        assert text in str(err.value)


def test_cross_field_rules_are_explained():
    with pytest.raises(ConfigError, match=r"optim.batch_size=30 must be divisible by run.num_workers=4"):
        load_config(None, ["optim.batch_size=30", "run.num_workers=4"])
    with pytest.raises(ConfigError, match="moco.num_splits=8"):
        load_config(None, ["optim.batch_size=36", "moco.bn_mode=split"])
    with pytest.raises(ConfigError, match="needs run.use_gpu"):
        load_config(None, ["moco.bn_mode=sync"])
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.name=imagefolder"])
    with pytest.raises(ConfigError, match=r"moco.head_bn=true needs the MLP head"):
        load_config(None, ["moco.head_bn=true", "moco.version=v1"])
    with pytest.raises(ConfigError, match=r"data.flip_p=1.5.*less than or equal to 1"):
        load_config(None, ["data.flip_p=1.5"])


def test_overrides_are_parsed_as_yaml_and_applied_to_the_recipe():
    cfg = load_config(EXPERIMENTS / "digits_moco_v2.yaml", ["moco.queue_size=512", "optim.milestones=[3, 5]",
                                                             "moco.mlp=false"])
    assert cfg.moco.queue_size == 512 and cfg.optim.milestones == [3, 5] and cfg.moco.use_mlp is False
    assert cfg.model.arch == "small_resnet_slim_wide"  # from the recipe
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["moco.queue_size"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such.yaml")


def test_every_shipped_recipe_validates():
    recipes = [p for p in EXPERIMENTS.glob("*.yaml") if p.stem.startswith(("digits_", "cifar10_moco", "imagenet_moco"))]
    assert len(recipes) >= 4
    for path in recipes:
        load_config(path)


def test_flattened_params_use_the_yaml_names():
    flat = flatten(PretrainConfig().model_dump(mode="json"))
    assert flat["moco.queue_size"] == 65536 and flat["moco.momentum"] == 0.999 and "run.seed" in flat


def test_cli_help_and_bad_config_exit_codes():
    out = subprocess.run([sys.executable, "-m", "mocoray.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "pretrain" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "mocoray.cli", "pretrain", "--set", "moco.momentum=1.5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "moco.momentum=1.5" in bad.stderr


def test_pretrain_without_a_recipe_runs_the_embedded_cpu_demo_and_shows_no_test_hooks():
    out = subprocess.run([sys.executable, "-m", "mocoray.cli", "pretrain", "--print-config"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    shown = PretrainConfig.model_validate(yaml.safe_load(out.stdout))
    assert shown == load_config(EXPERIMENTS / "digits_moco_v2.yaml")
    assert shown.model.arch == "small_resnet_slim_wide" and shown.run.num_workers == 2
    assert "debug" not in out.stdout  # fault injection is a test-only Python argument, not a config field
