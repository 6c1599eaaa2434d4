"""Learning-rate and momentum schedules against hand-computed values."""

import math

import pytest

from mocoray.core.schedule import lr_at, momentum_at


def test_cosine_momentum_starts_at_m_ends_at_one_and_only_rises():
    m = 0.99
    assert momentum_at(0.0, m, "cosine") == pytest.approx(0.99)
    assert momentum_at(1.0, m, "cosine") == pytest.approx(1.0)
    # halfway: 1 - (1 - m) * (1 + cos(pi/2)) / 2 = 1 - 0.01 / 2
    assert momentum_at(0.5, m, "cosine") == pytest.approx(0.995)
    values = [momentum_at(i / 100, m, "cosine") for i in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))
    assert momentum_at(0.37, m, "constant") == m


def test_lr_schedules_at_hand_computed_points():
    assert lr_at(0.0, 0.1, 10, "cosine", 0, [], 0.1) == pytest.approx(0.1)
    assert lr_at(5.0, 0.1, 10, "cosine", 0, [], 0.1) == pytest.approx(0.05)
    assert lr_at(2.5, 0.1, 10, "cosine", 0, [], 0.1) == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lr_at(7.0, 0.1, 10, "step", 0, [6, 8], 0.1) == pytest.approx(0.01)
    assert lr_at(0.5, 0.1, 10, "constant", 1, [], 0.1) == pytest.approx(0.1 * 0.501)  # linear warm-up
