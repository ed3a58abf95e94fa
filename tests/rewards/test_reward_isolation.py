"""RewardRunner: every failure mode, each policy, counting, abort on error rate, weighted totals."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from align.rewards import (
    RewardAbortError,
    RewardFunctionError,
    RewardRunner,
    RewardSpecError,
    math_accuracy,
)

PROMPTS = ["p1", "p2", "p3"]
COMPLETIONS = ["The answer is 1.", "The answer is 2.", "The answer is 9."]
ANSWERS = ["1", "2", "3"]


# Module-level reward functions (picklable, for isolation="process").
def ones(prompts, completions, completion_ids=None, **kwargs):
    return [1.0] * len(completions)


def raises(prompts, completions, completion_ids=None, **kwargs):
    raise RuntimeError("judge unavailable")


def returns_none(prompts, completions, completion_ids=None, **kwargs):
    return [None, 0.5, None]


def returns_nan(prompts, completions, completion_ids=None, **kwargs):
    return [math.nan, math.inf, "oops"]


def too_short(prompts, completions, completion_ids=None, **kwargs):
    return [1.0]


def not_a_list(prompts, completions, completion_ids=None, **kwargs):
    return 1.0


def as_tensor(prompts, completions, completion_ids=None, **kwargs):
    return torch.tensor([0.25] * len(completions))


def sleeps(prompts, completions, completion_ids=None, **kwargs):
    time.sleep(120)
    return [0.0] * len(completions)


class Blocking:
    """Blocks until released (a stuck remote judge)."""

    __name__ = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, prompts, completions, completion_ids=None, **kwargs):
        self.release.wait(60)
        return [0.0] * len(completions)


def run(funcs, **kw):
    runner = RewardRunner(funcs, **kw)
    return runner, runner(PROMPTS, COMPLETIONS, completion_ids=None, answer=ANSWERS)


# ---------------------------------------------------------------- outputs and weights


def test_per_function_matrix_and_weighted_total() -> None:
    _, out = run([math_accuracy, ones], weights=[2.0, 0.5])
    assert out.names == ("math_accuracy", "ones")
    assert out.per_function.shape == (3, 2) and out.total.shape == (3,)
    assert out.per_function[:, 0].tolist() == [1.0, 1.0, 0.0]
    assert out.total.tolist() == [2.5, 2.5, 0.5]


def test_nan_excluded_from_total_and_all_nan_rows_stay_nan() -> None:
    _, out = run([returns_none, ones], weights=[1.0, 3.0])
    assert out.total.tolist() == [3.0, 3.5, 3.0]  # None -> NaN, left out of the sum (TRL semantics)
    _, out = run([returns_none])
    assert math.isnan(out.total[0]) and out.total[1] == 0.5 and math.isnan(out.total[2])


def test_tensor_outputs_are_accepted() -> None:
    _, out = run([as_tensor])
    assert out.per_function[:, 0].tolist() == [0.25] * 3


def test_empty_batch() -> None:
    out = RewardRunner([math_accuracy, ones])([], [], completion_ids=[], answer=[])
    assert out.per_function.shape == (0, 2) and out.total.shape == (0,)


def test_duplicate_names_are_made_unique() -> None:
    _, out = run([ones, ones])
    assert out.names == ("ones", "ones_2")


# ---------------------------------------------------------------- failure modes x policies


@pytest.mark.parametrize(
    ("func", "counter", "expected_skip"),
    [
        (raises, "errors", [math.nan] * 3),
        (too_short, "bad_length", [math.nan] * 3),
        (not_a_list, "bad_length", [math.nan] * 3),
        (returns_none, "nones", [math.nan, 0.5, math.nan]),
        (returns_nan, "nans", [math.nan] * 3),
    ],
)
def test_failure_modes_with_skip_and_zero(func, counter: str, expected_skip: list[float]) -> None:
    runner, out = run([func], on_error="skip", max_error_rate=None)
    got = out.per_function[:, 0].tolist()
    assert [math.isnan(g) for g in got] == [math.isnan(e) for e in expected_skip]
    assert [g for g in got if not math.isnan(g)] == [e for e in expected_skip if not math.isnan(e)]
    stats = runner.stats[func.__name__]
    assert getattr(stats, counter) >= 1 and stats.calls == 1 and stats.samples == 3
    runner, out = run([func], on_error="zero", max_error_rate=None)
    assert not torch.isnan(out.per_function).any()
    assert out.per_function[:, 0].tolist() == [0.0 if math.isnan(e) else e for e in expected_skip]


@pytest.mark.parametrize("func", [raises, too_short, not_a_list, returns_none, returns_nan])
def test_failure_modes_with_abort(func) -> None:
    runner = RewardRunner([ones, func], on_error="abort")
    with pytest.raises(RewardFunctionError, match=func.__name__):
        runner(PROMPTS, COMPLETIONS)


def test_nan_and_invalid_values_are_counted_per_sample() -> None:
    runner, _ = run([returns_nan], max_error_rate=None)
    st = runner.stats["returns_nan"]
    assert (st.nans, st.failed_samples, st.errors) == (3, 3, 0)


def test_per_function_policies() -> None:
    _, out = run([raises, raises], on_error=["skip", "zero"], names=["a", "b"], max_error_rate=None)
    assert torch.isnan(out.per_function[:, 0]).all() and (out.per_function[:, 1] == 0).all()


# ---------------------------------------------------------------- timeouts


def test_thread_timeout_stops_waiting() -> None:
    blocking = Blocking()
    runner = RewardRunner([blocking, ones], timeout_s=[0.2, None], max_error_rate=None)
    assert runner.isolation == "thread"
    out = runner(PROMPTS, COMPLETIONS)  # returns although `blocking` is still running
    assert torch.isnan(out.per_function[:, 0]).all() and out.per_function[:, 1].tolist() == [1.0] * 3
    assert runner.stats["blocking"].timeouts == 1
    assert runner.metrics()["rewards/stuck_calls"] == 1.0
    blocking.release.set()
    for t in threading.enumerate():
        if t.name == "reward-blocking":
            t.join(30)
    assert runner.metrics()["rewards/stuck_calls"] == 0.0


def test_process_timeout_kills_the_worker_and_restarts() -> None:
    with RewardRunner(
        [sleeps, ones], timeout_s=0.5, isolation="process", mp_context="fork", max_error_rate=None
    ) as runner:
        out = runner(PROMPTS, COMPLETIONS)
        assert torch.isnan(out.per_function[:, 0]).all()
        assert runner.stats["sleeps"].timeouts == 1
        worker = runner._callers[0]
        assert worker._proc is None  # killed, not left running
        assert runner.metrics()["rewards/worker_restarts"] == 1.0
        # the other function ran in its own worker; errors inside a worker come back as errors
        assert out.per_function[:, 1].tolist() == [1.0] * 3


def test_process_isolation_reports_errors_and_keeps_serving() -> None:
    with RewardRunner([raises, ones], isolation="process", mp_context="fork", max_error_rate=None) as runner:
        for _ in range(2):
            out = runner(PROMPTS, COMPLETIONS)
        assert runner.stats["raises"].errors == 2
        assert out.per_function[:, 1].tolist() == [1.0] * 3


# ---------------------------------------------------------------- abort on error rate


def test_abort_once_error_rate_passes_threshold() -> None:
    runner = RewardRunner([raises, ones], max_error_rate=0.5, min_samples=6)
    runner(PROMPTS, COMPLETIONS)  # 3 samples seen: below min_samples, keeps going
    with pytest.raises(RewardAbortError, match=r"'raises' failed on 100\.0% of 6 samples") as info:
        runner(PROMPTS, COMPLETIONS)
    assert info.value.name == "raises" and info.value.rate == 1.0


def test_error_rate_below_threshold_keeps_running() -> None:
    flaky_calls = {"n": 0}

    def flaky(prompts, completions, completion_ids=None, **kwargs):
        flaky_calls["n"] += 1
        if flaky_calls["n"] % 4 == 0:
            raise RuntimeError("transient")
        return [1.0] * len(completions)

    runner = RewardRunner([flaky], max_error_rate=0.3, min_samples=3)
    for _ in range(8):
        runner(PROMPTS, COMPLETIONS)
    assert runner.stats["flaky"].errors == 2 and runner.stats["flaky"].error_rate == 0.25


def test_none_counts_towards_the_rate_only_when_asked() -> None:
    runner = RewardRunner([returns_none], max_error_rate=0.5, min_samples=3)
    runner(PROMPTS, COMPLETIONS)  # 2 of 3 None, not counted
    strict = RewardRunner([returns_none], max_error_rate=0.5, min_samples=3, count_none_as_error=True)
    with pytest.raises(RewardAbortError, match="returns_none"):
        strict(PROMPTS, COMPLETIONS)


# ---------------------------------------------------------------- metrics, specs, validation


def test_metrics_dict() -> None:
    runner = RewardRunner([raises, returns_none, returns_nan, too_short], max_error_rate=None)
    runner(PROMPTS, COMPLETIONS)
    m = runner.metrics()
    assert m["rewards/raises/errors"] == 1.0 and m["rewards/raises/error_rate"] == 1.0
    assert m["rewards/returns_none/nones"] == 2.0 and m["rewards/returns_none/error_rate"] == 0.0
    assert m["rewards/returns_nan/nans"] == 3.0
    assert m["rewards/too_short/bad_length"] == 1.0
    assert all(isinstance(v, float) for v in m.values())


def test_from_specs_with_per_entry_overrides() -> None:
    specs = [
        {"name": "accuracy", "weight": 2.0},
        {"name": "loop_penalty", "weight": 1.0, "p_max": 8, "on_error": "zero", "timeout_s": 5},
    ]
    runner = RewardRunner.from_specs(specs, on_error="skip")
    assert runner.on_error == ["skip", "zero"] and runner.timeout_s == [None, 5.0]
    assert runner.weights.tolist() == [2.0, 1.0] and runner.isolation == "thread"
    out = runner(PROMPTS, COMPLETIONS, answer=ANSWERS)
    assert out.total.tolist() == [2.0, 2.0, 0.0]


def test_bad_configuration_raises() -> None:
    with pytest.raises(ValueError, match="on_error"):
        RewardRunner([ones], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        RewardRunner([ones], timeout_s=-1)
    with pytest.raises(ValueError, match="isolation"):
        RewardRunner([ones], timeout_s=1, isolation="none")
    with pytest.raises(ValueError, match="weights"):
        RewardRunner([ones], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="prompts"):
        RewardRunner([ones])(["p"], COMPLETIONS)
    with pytest.raises(RewardSpecError, match="on_error"):
        RewardRunner.from_specs([{"name": "accuracy", "on_error": "retry"}])
