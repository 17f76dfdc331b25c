"""Two measurements side by side: half of torch's threads each, results in order, errors raised, nothing nested."""
import threading

import pytest
import torch

from lensdyn.parallel import side_by_side


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_two_calls_run_in_two_threads_with_half_the_threads_each(two_threads):
    seen = []

    def call(k):
        seen.append((threading.get_ident(), torch.get_num_threads(), side_by_side([lambda: k, lambda: -k])))
        return k

    assert side_by_side([lambda: call(1), lambda: call(2), lambda: call(3)]) == [1, 2, 3]
    assert {threads for _, threads, _ in seen} == {1}
    assert sorted(nested for _, _, nested in seen) == [[1, -1], [2, -2], [3, -3]]  # nested: one after the other
    assert threading.get_ident() not in {ident for ident, _, _ in seen}
    assert torch.get_num_threads() == 2


def test_an_error_in_either_call_is_raised_and_the_threads_are_restored(two_threads):
    def fails():
        raise ValueError("the control failed")

    with pytest.raises(ValueError, match="the control failed"):
        side_by_side([lambda: 1, fails])
    assert torch.get_num_threads() == 2
    assert side_by_side([lambda: 4, lambda: 5]) == [4, 5]  # not left marked as running


def test_a_single_thread_runs_the_calls_in_this_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert side_by_side([threading.get_ident, threading.get_ident]) == [threading.get_ident()] * 2
    finally:
        torch.set_num_threads(before)
