"""Batches collated ahead in a thread (``data.prefetch``): the same items in the same
order as without it, errors raised where they happened, the thread gone when the loop
stops early, and training bitwise the same with and without it."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.test_faults import run_overrides
from tests.test_train import compose_config
from transformer.checkpoint import read_checkpoint
from transformer.data.prefetch import prefetched
from transformer.trainer import train


def prefetch_threads() -> int:
    return sum(thread.name == "batch-prefetch" for thread in threading.enumerate())


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_the_same_items_in_the_same_order(depth):
    assert list(prefetched(iter(range(50)), depth)) == list(range(50))
    assert list(prefetched(iter([]), depth)) == []


def test_items_are_made_ahead_up_to_depth():
    made = []

    def items():
        for i in range(10):
            made.append(i)
            yield i

    stream = prefetched(items(), depth=3)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(made) < 5 and time.monotonic() < deadline:  # 0 taken, 3 queued, 1 waiting
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(made) == 5  # and no further: the queue holds 3
    assert list(stream) == list(range(1, 10))


def test_an_error_in_the_thread_is_raised_at_its_item():
    def items():
        yield 1
        yield 2
        raise ValueError("bad batch 3")

    stream = prefetched(items(), depth=2)
    assert [next(stream), next(stream)] == [1, 2]
    with pytest.raises(ValueError, match="bad batch 3"):
        next(stream)


def test_leaving_early_ends_the_thread():
    before = prefetch_threads()
    stream = prefetched(iter(range(1000)), depth=2)
    assert next(stream) == 0
    assert prefetch_threads() == before + 1
    stream.close()  # what a loop that stops (max_steps, a signal) does to its generator
    assert prefetch_threads() == before


@pytest.mark.usefixtures("one_thread")
def test_training_is_bitwise_the_same_with_and_without_prefetch(corpus, cache, tmp_path):
    for depth in (0, 3):
        train(compose_config(run_overrides(corpus, cache, 12, f"data.prefetch={depth}")),
              tmp_path / str(depth))
    without, with_ = (read_checkpoint(tmp_path / d / "checkpoints" / "checkpoint_last.pt")
                      for d in ("0", "3"))
    for name, tensor in without["model"].items():
        assert torch.equal(with_["model"][name], tensor), name
