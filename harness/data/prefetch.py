"""``ThreadedLoader``: a DataLoader's batches received by a background thread of the training process.

Receiving a batch from DataLoader workers costs the training process real time: unpickling it and, per
shared-memory tensor, a socket connection that hands over its file descriptor (~3 ms per batch of 64
canvases on our CI machine, a quarter of the batched pipeline's time there). On CUDA the DataLoader's own
pin-memory thread does this work; on the CPU this thread does, while the training thread computes (both
release the GIL while they wait or compute). The batches and their order are the loader's: nothing random
happens in the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

#: Batches received ahead of the training thread.
DEPTH = 2
_END = object()


class ThreadedLoader:
    """Iterates ``loader`` (a DataLoader with workers) in a background thread, ``depth`` batches ahead.

    Errors of the loader (a worker that died, a bad image) are raised in the consuming thread. Leaving an
    epoch early stops the thread before the next ``iter``, so one loader is never iterated twice at once."""

    def __init__(self, loader: Any, depth: int = DEPTH):
        self.loader, self.depth = loader, depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        batches: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(self.depth)
        stop = threading.Event()

        def put(item: tuple[Any, BaseException | None]) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def feed() -> None:
            try:
                for batch in self.loader:
                    if not put((batch, None)):
                        return
            except BaseException as e:  # handed to the consumer, which raises it
                put((None, e))
                return
            put((_END, None))

        thread = threading.Thread(target=feed, name="dmlh-loader", daemon=True)
        thread.start()
        try:
            while True:
                batch, error = batches.get()
                if error is not None:
                    raise error
                if batch is _END:
                    return
                yield batch
        finally:
            stop.set()
            thread.join()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.loader!r}, depth={self.depth})"


def received_in_thread(
    loader: torch.utils.data.DataLoader, device: torch.device
) -> torch.utils.data.DataLoader | ThreadedLoader:
    """``loader`` as the training or evaluation loop iterates it: through a ``ThreadedLoader`` when it has
    workers and ``device`` is not CUDA (there the DataLoader's pin-memory thread receives its batches)."""
    return ThreadedLoader(loader) if loader.num_workers > 0 and device.type != "cuda" else loader
