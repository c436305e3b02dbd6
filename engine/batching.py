"""The micro-batcher: concurrent `recommend` calls coalesced into one `Engine.recommend_many`.

A caller's request waits in a queue; one worker takes the first request, then keeps taking requests
until `max_batch` are in hand or `max_wait_us` microseconds have passed since the first, and serves
the batch with one batched lookup and top-k (requests with different k, filters or exclude_seen are
served by one call per distinct set of options). A failure of the batched call is raised in every
caller of that batch, never swallowed in the worker.
"""
import concurrent.futures
import queue
import threading
import time

MAX_BATCH = 64
MAX_WAIT_US = 200


class MicroBatcher:
    def __init__(self, engine, *, max_batch=MAX_BATCH, max_wait_us=MAX_WAIT_US):
        if max_batch < 1 or max_wait_us < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_us >= 0, got {max_batch}, {max_wait_us}")
        self.engine = engine
        self.max_batch = int(max_batch)
        self.max_wait = max_wait_us / 1e6
        self._queue = queue.SimpleQueue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="recscore-batcher", daemon=True)
        self._worker.start()

    def submit(self, user, k=10, *, exclude_seen=True, filters=None):
        """A Future of the Recommendation."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        future = concurrent.futures.Future()
        self._queue.put((future, user, (k, exclude_seen, freeze_filters(filters)), filters))
        return future

    def recommend(self, user, k=10, *, exclude_seen=True, filters=None, timeout=None):
        return self.submit(user, k, exclude_seen=exclude_seen, filters=filters).result(timeout)

    def close(self):
        """Serve what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._worker.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self):
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.perf_counter() + self.max_wait
            stop = False
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter()
                try:
                    request = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                batch.append(request)
            self._serve(batch)
            if stop:
                return

    def _serve(self, batch):
        self.engine.metrics.batch_size.observe(len(batch))
        groups = {}
        for request in batch:
            groups.setdefault(request[2], []).append(request)
        for (k, exclude_seen, _), requests in groups.items():
            live = [r for r in requests if r[0].set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self.engine.recommend_many([r[1] for r in live], k, exclude_seen=exclude_seen,
                                                     filters=live[0][3])
            except BaseException as error:   # every caller of the batch gets the exception
                for future, *_ in live:
                    future.set_exception(error)
                continue
            for (future, *_), result in zip(live, results):
                future.set_result(result)


def freeze_filters(filters):
    """A hashable key of a filters dict: requests with equal keys can share one recommend_many."""
    if not filters:
        return None
    if not isinstance(filters, dict):
        return ("invalid", id(filters))   # recommend_many raises the error for this request's group
    return tuple(sorted((key, tuple(sorted(value or ()))) for key, value in filters.items()))
