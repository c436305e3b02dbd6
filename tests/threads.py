"""Running test workers in threads: a worker's exception fails the test, and so does a worker that
does not finish in time (the test never hangs).

    from threads import run_workers
    run_workers([functools.partial(search, seed) for seed in range(6)], timeout=20)
"""
import contextvars
import threading
import time

DEFAULT_TIMEOUT_S = 60


def run_workers(workers, *, timeout=DEFAULT_TIMEOUT_S, stop=None):
    """Run each callable of `workers` in its own thread, in a copy of the caller's context (so
    `use_backend` and `use_cpu_level` blocks reach them), and wait for all of them.

    The first exception a worker raises is raised here once every worker has ended (or the time is
    up). `stop`: an
    optional threading.Event, set when a worker fails, for workers that loop until it is set
    (readers waiting for a writer that crashed). TimeoutError if any worker is still running after
    `timeout` seconds (it runs on as a daemon thread; the test fails rather than hangs).
    """
    failures = []
    failed = threading.Lock()

    def run(worker, context):
        try:
            context.run(worker)
        except BaseException as error:   # noqa: B036  (a worker's failure of any kind fails the test)
            with failed:
                failures.append(error)
            if stop is not None:
                stop.set()

    threads = [threading.Thread(target=run, args=(worker, contextvars.copy_context()), daemon=True,
                                name=f"worker {i}: {getattr(worker, '__name__', type(worker).__name__)}")
               for i, worker in enumerate(workers)]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    running = [thread.name for thread in threads if thread.is_alive()]
    if failures:
        raise failures[0]
    if running:
        raise TimeoutError(f"{len(running)} of {len(threads)} workers still running after {timeout} s: {running}")
