"""The thread-count precedence rule (a pure function) and its use by configure_threads."""

from __future__ import annotations

import pytest
import torch

from matbench_dim import runtime
from matbench_dim.runtime import SINGLE_THREAD_MAX_CPUS, configure_threads, resolve_threads

UNTOUCHED = {"current": 8, "startup": 8}  # torch still at the count it started with


def test_explicit_value_wins_over_everything():
    assert resolve_threads(3, "5", n_cpus=2, current=7, startup=8, omp_set=True) == 3


def test_environment_variable_comes_next():
    assert resolve_threads(None, "5", n_cpus=2, current=7, startup=8, omp_set=True) == 5
    assert resolve_threads(None, " 2 ", n_cpus=64, **UNTOUCHED) == 2


def test_a_choice_already_made_is_kept():
    # OMP_NUM_THREADS set, or torch.set_num_threads called since import
    assert resolve_threads(None, None, n_cpus=2, current=8, startup=8, omp_set=True) == 8
    assert resolve_threads(None, None, n_cpus=2, current=3, startup=8) == 3
    assert resolve_threads(None, "", n_cpus=2, current=3, startup=8) == 3


def test_default_rule_one_thread_on_small_machines_else_torch_default():
    for n in range(1, SINGLE_THREAD_MAX_CPUS + 1):
        assert resolve_threads(None, None, n_cpus=n, **UNTOUCHED) == 1
    assert resolve_threads(None, None, n_cpus=SINGLE_THREAD_MAX_CPUS + 1, **UNTOUCHED) == 8


@pytest.mark.parametrize(("explicit", "env"), [(0, None), (None, "0"), (None, "two")])
def test_bad_values_raise(explicit, env):
    with pytest.raises(ValueError, match=r"n_threads|MATBENCH_DIM_NUM_THREADS"):
        resolve_threads(explicit, env, n_cpus=2, **UNTOUCHED)


def test_configure_threads_applies_the_rule(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv(runtime.THREADS_ENV, raising=False)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
        monkeypatch.setattr(runtime, "_TORCH_STARTUP_THREADS", torch.get_num_threads())
        assert configure_threads(None) == 1
        assert torch.get_num_threads() == 1
        monkeypatch.setenv(runtime.THREADS_ENV, "2")
        assert configure_threads(None) == 2
        assert configure_threads(1) == 1
    finally:
        torch.set_num_threads(before)


def test_configure_allocator_is_idempotent_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(runtime, "_ALLOCATOR", {})
    monkeypatch.setenv(runtime.MALLOC_ENV, "0")
    assert runtime.configure_allocator() is False
    monkeypatch.setenv(runtime.MALLOC_ENV, "1")
    assert runtime.configure_allocator() is False  # the first answer stands
