"""Cases in worker processes: one case per worker at a time, a progress bar over cases.

A task is small (paths and params); each worker writes its own output files and returns a small
result, so memory is bounded by one case per worker and nothing large crosses processes. The
results come back in task order whatever order the workers finish in, so the output does not
depend on the number of workers. Workers start from a fork server (a clean process that has
imported the task's module once) where the platform has one, else they are spawned; each ignores
Ctrl-C, which the parent handles: it cancels the cases not started and waits for the running ones
before the caller cleans up.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from tqdm import tqdm

from covidseg.errors import CovidSegError

log = logging.getLogger(__name__)

Task = TypeVar("Task")
Result = TypeVar("Result")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_count(requested: int | None, tasks: int) -> int:
    """`requested` workers (None: one per core), never more than there are tasks."""
    return max(1, min(requested or available_cores(), tasks))


def _start_worker(threads: int) -> None:
    """Worker initialiser: the parent handles Ctrl-C; the cores are shared between workers
    (torch's threads, where the task's module uses torch)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _context(module: str | None) -> multiprocessing.context.BaseContext:
    """A fork server that imports `module` once where the platform has one, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([module] if module else [])
        return context
    return multiprocessing.get_context("spawn")


def map_cases(
    function: Callable[[Task], Result], tasks: Sequence[Task], *, workers: int, desc: str
) -> list[Result]:
    """`function` of every task, in task order, with `workers` processes (1: in this one)."""
    with tqdm(total=len(tasks), desc=desc, unit="case", dynamic_ncols=True) as bar:
        if workers <= 1 or len(tasks) <= 1:
            results = []
            for task in tasks:
                results.append(function(task))
                bar.update()
            return results
        threads = max(1, available_cores() // workers)
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_context(getattr(function, "__module__", None)),
            initializer=_start_worker,
            initargs=(threads,),
        )
        try:
            futures = {pool.submit(function, task): i for i, task in enumerate(tasks)}
            done = _collect(futures, bar)
        except BrokenProcessPool:
            raise CovidSegError(
                f"{desc}: a worker process died (out of memory?); set runtime.prepare_workers "
                "lower (each worker holds one case)"
            ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return [done[i] for i in range(len(tasks))]


def _collect(futures: dict[Future[Result], int], bar: tqdm) -> dict[int, Result]:
    """The results by task index, as the workers finish them; the first failure is raised."""
    done: dict[int, Result] = {}
    for future in as_completed(futures):
        done[futures[future]] = future.result()
        bar.update()
    return done
