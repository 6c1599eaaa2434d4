"""Elastic `run.num_workers: [min, max]`: the global batch is fixed, so every world size must divide it."""

from __future__ import annotations

import pytest

from mocoray.config import ConfigError, flatten, load_config


def test_a_worker_range_is_elastic_and_keeps_its_bounds():
    cfg = load_config(None, ["run.num_workers=[2, 4]", "optim.batch_size=24", "run.max_failures=-1"])
    assert cfg.run.elastic and list(cfg.run.world_sizes) == [2, 3, 4] and cfg.run.max_workers == 4
    assert flatten(cfg.model_dump(mode="json"))["run.num_workers"] == [2, 4]
    fixed = load_config(None, ["run.num_workers=2"])
    assert not fixed.run.elastic and list(fixed.run.world_sizes) == [2]


def test_a_world_size_in_the_range_that_does_not_divide_the_global_batch_is_refused_up_front():
    with pytest.raises(ConfigError, match=r"optim.batch_size=32 must be divisible by run.num_workers=3 "
                                          r"\(a world size of the elastic range run.num_workers=\[2, 4\]"):
        load_config(None, ["run.num_workers=[2, 4]", "optim.batch_size=32", "run.max_failures=-1"])


def test_a_range_down_to_one_worker_checks_the_split_bn_of_a_single_worker():
    # one worker turns shuffle BN into SplitBatchNorm: 12 images in 8 splits do not divide
    with pytest.raises(ConfigError, match=r"per-worker batch 12 \(optim.batch_size / 1 workers\) must be divisible "
                                          r"by moco.num_splits=8"):
        load_config(None, ["run.num_workers=[1, 2]", "optim.batch_size=12", "run.max_failures=3"])
    load_config(None, ["run.num_workers=[1, 2]", "optim.batch_size=16", "run.max_failures=3"])


def test_an_elastic_run_that_would_fail_at_the_first_lost_node_is_refused():
    with pytest.raises(ConfigError, match=r"run.num_workers=\[1, 2\] is elastic, but run.max_failures=0"):
        load_config(None, ["run.num_workers=[1, 2]", "optim.batch_size=16"])


@pytest.mark.parametrize("value", ["[0, 2]", "[3, 2]", "0"])
def test_an_empty_or_inverted_worker_range_is_refused(value):
    with pytest.raises(ConfigError, match="run.num_workers"):
        load_config(None, [f"run.num_workers={value}"])
