"""Loss-weight schedules: weights at 0, 25, 50, 75 and 100 % of training; multi-step phases."""

import numpy as np
import pytest

from locnet.schedules import (
    Phases,
    level_weights,
    multistep_level,
    multistep_phase,
    phase_bounds,
    training_fraction,
)

# 101 epochs: epochs 0, 25, 50, 75, 100 are exactly t = 0, .25, .5, .75, 1.
LINEAR_4 = {  # index = level, 0 = finest
    0: [0.0, 0.0, 0.0, 1.0],
    25: [0.0, 0.0, 0.75, 0.25],
    50: [0.0, 0.5, 0.5, 0.0],
    75: [0.25, 0.75, 0.0, 0.0],
    100: [1.0, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("epoch", sorted(LINEAR_4))
def test_linear_four_levels(epoch):
    w = level_weights("linear", epoch, 101, 4)
    assert w.shape == (4,) and w.dtype == np.float32
    np.testing.assert_allclose(w, LINEAR_4[epoch], atol=1e-6)


def test_linear_properties():
    for n_levels in (2, 3, 4, 5):
        for epoch in range(0, 60):
            w = level_weights("linear", epoch, 60, n_levels)
            assert np.all(w >= 0) and abs(w.sum() - 1.0) < 1e-6
        assert level_weights("linear", 0, 60, n_levels)[-1] == 1.0  # coarsest starts at 1
        assert level_weights("linear", 59, 60, n_levels)[0] == 1.0  # finest ends at 1
    np.testing.assert_allclose(level_weights("linear", 50, 101, 2), [0.5, 0.5])
    np.testing.assert_allclose(level_weights("linear", 7, 10, 1), [1.0])
    # past the end: clipped to the final weights
    np.testing.assert_allclose(level_weights("linear", 500, 101, 4), [1, 0, 0, 0])
    assert training_fraction(0, 1) == 0.0


# Authors' steps (coarsest first), reversed into level order.
STEP_4 = {
    0: [0.0, 0.0, 0.2, 0.8],
    125: [0.0, 0.2, 0.7, 0.1],
    250: [0.2, 0.7, 0.1, 0.0],
    375: [0.8, 0.2, 0.0, 0.0],
    499: [1.0, 0.0, 0.0, 0.0],
}


@pytest.mark.parametrize("epoch", sorted(STEP_4))
def test_step_four_levels_500_epochs(epoch):
    np.testing.assert_allclose(level_weights("step", epoch, 500, 4), STEP_4[epoch], atol=1e-6)


def test_step_scales_with_total_epochs_and_boundaries():
    # 100-epoch steps at 500 epochs -> 10-epoch steps at 50 epochs
    np.testing.assert_allclose(level_weights("step", 9, 50, 4), STEP_4[0], atol=1e-6)
    np.testing.assert_allclose(level_weights("step", 10, 50, 4), STEP_4[125], atol=1e-6)
    np.testing.assert_allclose(level_weights("step", 99, 500, 4), STEP_4[0], atol=1e-6)
    np.testing.assert_allclose(level_weights("step", 100, 500, 4), STEP_4[125], atol=1e-6)
    for n_levels in (2, 3, 5):
        for epoch in range(30):
            w = level_weights("step", epoch, 30, n_levels)
            assert abs(w.sum() - 1.0) < 1e-6
        assert level_weights("step", 29, 30, n_levels)[0] == 1.0
    np.testing.assert_allclose(level_weights("step", 0, 30, 2), [0.2, 0.8], atol=1e-6)


@pytest.mark.parametrize(
    "epoch,level", [(0, 3), (24, 3), (25, 2), (50, 1), (75, 0), (99, 0)]
)
def test_multistep_one_hot(epoch, level):
    w = level_weights("multistep", epoch, 100, 4)
    expected = np.zeros(4)
    expected[level] = 1.0
    np.testing.assert_array_equal(w, expected)
    assert multistep_level(epoch, 100, 4) == level


def test_bad_arguments():
    with pytest.raises(ValueError):
        level_weights("cosine", 0, 10, 4)
    with pytest.raises(ValueError):
        level_weights("linear", -1, 10, 4)
    with pytest.raises(ValueError):
        level_weights("linear", 0, 0, 4)


def test_phase_bounds():
    assert phase_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    b = phase_bounds(10, 4)
    assert b[0][0] == 0 and b[-1][1] == 10 and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    assert multistep_phase(0, 8, 4) == (0, 3) and multistep_phase(7, 8, 4) == (3, 0)
    assert phase_bounds(2, 3)[-1] == (2, 2)  # too few epochs: an empty last phase


def test_phases_of_a_run():
    ms = Phases(8, 4, multistep=True)
    assert ms.bounds == phase_bounds(8, 4) and not ms.has_empty_phase()
    assert [ms.phase_of(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [ms.trained_level(p) for p in range(4)] == [3, 2, 1, 0]
    # history epochs are 1-based: epoch 3 is training epoch 2, the first of phase 1
    assert ms.history_range(3) == ms.history_range(4) == (3, 4)
    assert Phases(2, 3, multistep=True).has_empty_phase()
    one = Phases(8, 4, multistep=False)
    assert one.bounds == [(0, 8)] and one.phase_of(7) == 0 and one.trained_level(0) is None
    assert one.history_range(1) == one.history_range(8) == (1, 8)
