"""Batches made ahead of the step that needs them: ``prefetched`` runs an iterator (the
epoch's collation: indexing the memory-mapped ids, padding, pinning for a GPU copy) in a
background thread, ``depth`` items ahead, while the main thread runs the model. The items
and their order are those of the iterator, so exact resume and the ranks' shares are as
without it; a batch not yet taken when the loop stops is simply dropped."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()  # the iterator ran out


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items``, each made up to ``depth`` items before it is taken; ``depth`` 0: in the
    calling thread, as they are asked for. An error in the thread is raised here, at the
    item where it happened."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():  # never blocks for good once the consumer has left
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(error))

    thread = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
