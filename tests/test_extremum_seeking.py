import math

import numpy as np
import pytest

from bcdi_bluesky.tuning import ExtremumSeeker


@pytest.fixture
def target():
    return np.random.default_rng(0).uniform(-0.5, 0.5, 20)


def test_quadratic_bowl_in_20_dimensions(target):
    es = ExtremumSeeker(np.zeros(20), gain=5.0, dither=0.07, seed=1)
    result = es.minimise(lambda p: float(np.sum((p - target) ** 2)), max_iter=3000)
    assert np.linalg.norm(result.best_params - target) < 0.05
    assert result.best_cost < 0.01 * np.sum(target**2)
    assert result.iterations == 3000 and result.stopped_by == "iterations"


def test_noisy_cost(target):
    rng = np.random.default_rng(5)
    start = float(np.sum(target**2))

    es = ExtremumSeeker(np.zeros(20), gain=5.0, dither=0.07, seed=2)
    visited = []
    for _ in range(3000):
        p = es.ask()
        visited.append(p)
        es.tell(float(np.sum((p - target) ** 2)) + rng.normal(0, 0.02 * start))
    # The best *measured* cost is biased by the noise, and the dither keeps the point moving:
    # the running mean of the visited points is what converges (from 1.44 away).
    assert np.linalg.norm(np.mean(visited[-300:], axis=0) - target) < 0.15


def test_tracks_a_slowly_moving_minimum():
    es = ExtremumSeeker(np.zeros(4), gain=5.0, dither=0.07, seed=3)
    errors = []
    for n in range(6000):
        centre = 0.4 * np.array([math.sin(n / 1500), math.cos(n / 1500), 0.5, -0.5])
        p = es.ask()
        es.tell(float(np.sum((p - centre) ** 2)) + 0.01)
        if n > 2000:
            errors.append(np.linalg.norm(p - centre))
    assert np.max(errors) < 0.15


def test_negative_gain_maximises_and_steps_stay_bounded():
    es = ExtremumSeeker(np.full(3, -0.5), gain=-5.0, dither=0.07, seed=4)
    bound = es.step_bound.copy()
    rng = np.random.default_rng(1)
    previous = es.ask()
    for _ in range(2000):
        p = es.ask()
        spike = 1e6 if rng.uniform() < 0.05 else 0.0  # wild outliers do not throw it far
        es.tell(-float(np.sum((p - 0.3) ** 2)) + spike)
        assert np.all(np.abs(es.ask() - previous) <= bound + 1e-12)
        previous = es.ask()
    assert np.linalg.norm(es.ask() - 0.3) < 0.15


def test_parameters_stay_in_bounds_and_bad_costs_are_ignored():
    es = ExtremumSeeker(np.full(2, 0.99), gain=5.0, dither=0.1)
    for i in range(500):
        p = es.ask()
        es.tell(float("nan") if i % 7 == 0 else -float(np.sum(p)))
        assert np.all(np.abs(es.ask()) <= 1.0)
    assert np.all(es.ask() > 0.8)  # it pushed against the upper bound, and stayed inside


def test_deterministic_and_ask_tell_equals_minimise(target):
    def cost(p):
        return float(np.sum((p - target) ** 2))

    a = ExtremumSeeker(np.zeros(20), seed=7).minimise(cost, max_iter=200)
    b = ExtremumSeeker(np.zeros(20), seed=7).minimise(cost, max_iter=200)
    np.testing.assert_array_equal(a.final_params, b.final_params)
    es = ExtremumSeeker(np.zeros(20), seed=7)
    for _ in range(200):
        es.tell(cost(es.ask()))
    np.testing.assert_array_equal(es.ask(), a.final_params)
    c = ExtremumSeeker(np.zeros(20), seed=8).minimise(cost, max_iter=200)
    assert not np.array_equal(c.final_params, a.final_params)


def test_budgets_and_hook_stop_the_run():
    calls = []
    es = ExtremumSeeker(np.zeros(3))
    r = es.minimise(lambda p: 1.0, max_iter=1000, hook=lambda i, p, c: calls.append(i) or i < 9)
    assert r.iterations == 10 and r.stopped_by == "hook" and calls == list(range(10))
    r = ExtremumSeeker(np.zeros(3)).minimise(lambda p: 1.0, max_iter=10**7, time_budget_s=0.05)
    assert r.stopped_by == "time" and r.iterations < 10**7


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p0": []}, "at least one"),
        ({"p0": [np.nan]}, "NaN"),
        ({"gain": 0.0}, "gain"),
        ({"decay": 1.5}, "decay"),
        ({"omega_range": (2.0, 1.0)}, "omega"),
        ({"dither": -1}, "dither"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match):
    args = {"p0": [0.0, 0.0], **kwargs}
    with pytest.raises(ValueError, match=match):
        ExtremumSeeker(**args)
