"""Rank 0's line per epoch, on the driver's console as each epoch ends.

Ray starts with ``log_to_driver=False`` (medray.runtime.init_ray): its actors print notices that a
person running a job should not have to read, and those stay in the session's log files. The epoch
lines travel instead through a small queue actor, so they reach the console of the driver, wherever
it runs: a terminal, a pipe, or ``ray job logs``.
"""

from __future__ import annotations

import logging
import sys
import threading

from ray.util.queue import Empty, Queue

log = logging.getLogger("medray.training")


class EpochLines:
    """``with EpochLines() as lines:`` hand ``lines.queue`` to the workers; ``say(queue, line)`` there
    logs the line on the driver (``medray.training`` at INFO) within a fraction of a second."""

    def __init__(self):
        # No CPU: the queue must start even when the training workers hold every CPU of the cluster.
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._done = threading.Event()
        self._echo = threading.Thread(target=self._run, name="medray-epoch-lines", daemon=True)

    def __enter__(self) -> EpochLines:
        self._echo.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._echo.join()
        self.queue.shutdown()

    def _run(self) -> None:
        # Puts are synchronous, so once training returns every line is queued: drain, then stop.
        while True:
            try:
                log.info(self.queue.get(timeout=0.5))
            except Empty:
                if self._done.is_set():
                    return


def say(queue: Queue | None, line: str) -> None:
    """On a worker: ``line`` to the driver's console (when a queue was given) and to this worker's log file."""
    # Ray Train's patched print() writes twice when stdout is wrapped, as it is in Ray workers.
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()
    if queue is not None:
        queue.put(line)
