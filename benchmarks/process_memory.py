"""Peak memory and CPU time of a process tree (a driver and its local Ray: GCS, raylet, workers, actors), from /proc.

PSS (proportional set size) divides shared pages (Ray's object store is shared memory) among the
processes that map them, so summing it over the tree counts nothing twice. Linux only; psutil is not
a dependency of medray, and /proc gives the same figures.
"""

from __future__ import annotations

import os
import threading


def _descendants(root: int) -> list[int]:
    """``root`` and every process under it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_pss(root: int) -> int:
    """Bytes: the summed PSS of ``root``'s process tree, shared memory divided among its users."""
    total = 0
    for pid in _descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass  # exited meanwhile
    return total


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system) used so far by ``root`` (default this process) and every process under
    it that is still running: the difference over a stretch of work is what the work cost in CPU, whatever
    else shares the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in _descendants(root or os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass  # exited meanwhile
    return total


class PeakSampler:
    """A thread that samples ``tree_pss(root)`` every ``interval`` seconds while in its ``with`` block; ``peak`` is the highest."""

    def __init__(self, root: int | None = None, interval: float = 0.5):
        self.root, self.interval, self.peak = root or os.getpid(), interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_pss(self.root))
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, tree_pss(self.root))
