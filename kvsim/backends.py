"""Where sweep and search points run: in-process, on a local process pool, or as Ray tasks on a
local instance or a cluster. ``execute`` yields each task's result as it finishes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from typing import Any, Literal

from kvsim.errors import KvsimError

Backend = Literal["local", "ray"]


def available_cores() -> int:
    """Cores this process may use (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_backend(backend: str, address: str | None, jobs: int | None) -> None:
    """The backend arguments, checked before any work starts (``execute`` runs lazily)."""
    if jobs is not None and jobs <= 0:
        raise KvsimError("must be a positive integer", field="--jobs", value=jobs)
    if backend not in ("local", "ray"):
        raise KvsimError("unknown backend (expected local or ray)", field="--backend", value=backend)
    if address and backend != "ray":
        raise KvsimError("--address names a Ray cluster: it needs --backend ray", field="--address",
                         value=address)


def execute(fn: Callable[..., Any], tasks: Sequence[tuple], backend: Backend = "local",
            jobs: int | None = None, address: str | None = None) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*task)`` for every task; yield ``(task index, result)`` as each finishes.

    ``local``: in-process for one job, else a process pool of ``jobs`` workers. ``ray``: one Ray
    task per item, on the cluster at ``address`` or on a local instance of ``jobs`` CPUs. ``fn``
    must be a module-level function.
    """
    jobs = jobs or available_cores()
    check_backend(backend, address, jobs)
    if backend == "ray":
        yield from _execute_ray(fn, tasks, jobs, address)
    elif jobs == 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            yield i, fn(*task)
    else:
        context = _worker_context()
        lifeline, keep_alive = context.Pipe(duplex=False)  # only this process holds keep_alive
        with keep_alive, ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=context,
                                             initializer=_die_with_parent, initargs=(lifeline,)) as pool:
            try:
                # submitting starts the workers: a Ctrl-C among the submits must stop them too (the
                # pool's own exit would wait for their running points)
                futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
                for fut in as_completed(futures):
                    yield futures[fut], fut.result()
            except BrokenProcessPool:
                raise KvsimError("a worker process died (out of memory, or killed); finished points are "
                                 "saved: run the same command again to resume", field="--jobs",
                                 value=jobs) from None
            except BaseException:
                # Ctrl-C, SIGTERM or an error: stop the running points too (shutdown alone waits for
                # them). There is no public API for this before Python 3.14's terminate_workers().
                for proc in list((pool._processes or {}).values()):  # noqa: SLF001
                    proc.terminate()
                pool.shutdown(wait=False, cancel_futures=True)
                raise


def _die_with_parent(lifeline: Connection) -> None:
    """Pool initializer: a worker never outlives the sweep that started it (a SIGKILLed parent
    cannot clean up, and orphaned workers would keep its memory and its output pipes). Ctrl-C is the
    parent's to handle: it stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(lifeline,), daemon=True).start()


def _watch_parent(lifeline: Connection) -> None:
    """Exit when the parent's end of ``lifeline`` closes, which the kernel does when the parent
    dies, however it dies (a pid check would take an unreaped parent for a live one, and the
    kernel's parent-death signal would name the forkserver, which waits for the workers)."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os._exit(1)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers fork from a server process that has already imported the simulator (no per-worker
    import, and no fork of a parent that may hold threads); spawn where there is no forkserver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["kvsim.scenario", "kvsim.search"])
    return ctx


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast when nothing listens at a Ray address (``ray.init`` would retry for minutes)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise KvsimError(f"no Ray cluster answers there ({err.strerror or err})", field="--address",
                         value=address) from None


def _execute_ray(fn: Callable[..., Any], tasks: Sequence[tuple], jobs: int,
                 address: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import ray
    except ImportError:
        raise KvsimError("the ray backend needs Ray: pip install 'kvsim[ray]'", field="--backend",
                         value="ray") from None
    started = not ray.is_initialized()
    if started:
        if address:
            _check_reachable(address)
        # A cluster brings its own CPUs; a local instance gets exactly the cores given (--jobs).
        options = {"address": address} if address else {"num_cpus": jobs, "include_dashboard": False}
        try:
            ray.init(**options, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise KvsimError(f"cannot start or reach Ray: {str(err).splitlines()[0]}", field="--address",
                             value=address) from None
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        refs = {remote.remote(*task): i for i, task in enumerate(tasks)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield refs[ref], ray.get(ref)
    finally:
        if started:
            ray.shutdown()
