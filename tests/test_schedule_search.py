"""benchmarks/schedule_search.py: the schedules it builds, and its sensitivity and comparison passes on the shared
tiny engines folder."""

import importlib.util
from pathlib import Path

import pytest

from ddit_export.bench import builtin_prompts

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "schedule_search.py"


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("schedule_search", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labels_are_run_lengths(search):
    assert search.label([1, 1, 4, 4, 4]) == "1x2,4x3"
    assert search.label([2]) == "2x1"
    long = search.label([1, 2] * 20)
    assert len(long) == 40 and long.endswith("...")


def test_families_cover_first_last_and_periodic_per_size(search):
    out = search.families(8, [2, 4])
    assert len(out) == 16 and all(len(s) == 8 for s in out)
    assert [2, 2, 1, 1, 1, 1, 1, 1] in out  # 2p first for a quarter
    assert [1, 1, 4, 4, 4, 4, 4, 4] in out  # 4p last for three quarters
    assert [1, 4, 1, 4, 1, 4, 1, 4] in out and [1, 1, 1, 2, 1, 1, 1, 2] in out


def test_greedy_adds_the_cheapest_step_per_ms_saved_first(search):
    steps = 4
    # 2p saves 5 ms a step, 4p 8 ms. Costs: step 2 is cheapest at 2p, step 0 dearest at both.
    cost = {(0, 2): 0.9, (1, 2): 0.2, (2, 2): 0.05, (3, 2): 0.3, (0, 4): 1.0, (1, 4): 0.1, (2, 4): 0.8, (3, 4): 0.9}
    step_ms = {1: 10.0, 2: 5.0, 4: 2.0}
    out = search.greedy(cost, step_ms, steps, [2, 4])
    # 3 orders (2p, 4p, mixed) x every second prefix of 4 candidates
    assert len(out) == 6
    two, two_all, four, four_all, mixed, mixed_all = out
    assert two == [1, 2, 2, 1]  # steps 2 (0.01/ms) and 1 (0.04/ms)
    assert two_all == [2, 2, 2, 2]
    assert four == [1, 4, 4, 1]  # steps 1 (0.0125/ms) and 2 (0.1/ms)
    assert four_all == [4, 4, 4, 4]
    # per step the cheaper per ms saved: 0 -> 4p (0.125 vs 0.18), 1 -> 4p, 2 -> 2p, 3 -> 2p (0.06 vs 0.1125)
    assert mixed == [1, 4, 2, 1] and mixed_all == [4, 4, 2, 2]


def test_sensitivity_and_comparison_on_real_engines(search, tiny_engines):
    from ddit_runtime.pipeline import FluxRuntime

    runtime = FluxRuntime(tiny_engines)
    prompts = builtin_prompts("flux", 1)
    cost, step_ms = search.sensitivity(runtime, prompts, 4, [2, 4])
    assert set(cost) == {(i, k) for i in range(4) for k in (2, 4)}
    assert all(0.0 < c < 1.0 for c in cost.values())  # a coarse step changes the image, but not into noise
    assert set(step_ms) == {1, 2, 4}
    methods = [("native", dict(schedule=[1] * 4)), ("4p", dict(schedule=[4] * 4)), ("2 steps", dict(steps=2))]
    rows = search.compare(runtime, prompts, 4, methods)
    native, coarse, fewer = rows
    assert native["speedup"] == 1.0 and native["ssim"] == 1.0 and native["coarse"] == 0.0
    assert coarse["coarse"] == 1.0 and coarse["ssim"] < 1.0
    assert fewer["schedule"] is None and 0.0 <= fewer["score"] <= 1.0
