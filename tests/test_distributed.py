"""recscore.distributed on a local Ray cluster: sharded top-k equal to the single-machine `topk` bit for
bit (many tied scores, every metric and dtype, exclusions, k past a shard's size), live adds and
removes, corpus epochs, a shard killed mid-query, and engine replicas behind Ray Serve sharing feedback.

The tests that need the cluster (`@in_ray_process`) run in a child pytest process of this file that
holds the module's one cluster (ray.init(num_cpus=2)): a Ray driver leaves native threads (gRPC
timers) running after ray.shutdown(), which would wake during later tests of this process that
check no thread runs (test_encoder.py). Each of them here reports the child's outcome of the same
test, failure text included.
"""
import dataclasses
import functools
import inspect
import os
import subprocess
import sys
import threading
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray path needs Ray: pip install 'recscore[ray]'")

from recscore import distributed as rd          # noqa: E402
from recscore.kernels import quantize_rows, topk  # noqa: E402

from engine_data import SMALL_CONFIG, build_small  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")   # Ray Serve's pydantic use
DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
METRICS = ("ip", "cosine", "l2")


CHILD = os.environ.get("RECSCORE_RAY_TESTS") == "child"
CHILD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def cluster():
    if not CHILD:   # the parent runs no cluster: see the module docstring
        yield None
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    try:
        from ray import serve
        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def child_outcomes(tmp_path_factory):
    """{test name: (outcome, text)} of this file's cluster tests, run once in a child pytest process."""
    report = tmp_path_factory.mktemp("ray-tests") / "junit.xml"
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider",
                          f"--junitxml={report}"], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "RECSCORE_RAY_TESTS": "child"}, timeout=CHILD_TIMEOUT_S)
    if not report.exists():
        pytest.fail(f"the child pytest process wrote no report (exit {run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        result = ("passed", "")
        for tag in ("failure", "error", "skipped"):
            element = case.find(tag)
            if element is not None:
                result = (tag, (element.get("message") or "") + "\n" + (element.text or ""))
                break
        outcomes[case.get("name")] = result
    return outcomes


def in_parent(test):
    """A test without the cluster: run here only."""
    return pytest.mark.skipif(CHILD, reason="runs in the parent pytest process")(test)


def in_ray_process(test):
    """Run the test in the child process that holds the cluster; here, report its outcome there."""
    if CHILD:
        return test

    @functools.wraps(test)
    def report(**fixtures):
        request = fixtures["request"]
        outcome, text = request.getfixturevalue("child_outcomes").get(request.node.name, ("missing", ""))
        if outcome == "skipped":
            pytest.skip(text.strip().splitlines()[0] if text.strip() else "skipped in the child process")
        assert outcome == "passed", f"{request.node.name} {outcome} in the Ray test process:\n{text}"

    signature = inspect.signature(test)
    parameters = [p for name, p in signature.parameters.items() if name in ("dtype", "request")]   # params only
    if "request" not in signature.parameters:
        parameters.append(inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY))
    report.__signature__ = signature.replace(parameters=parameters)
    return report


def tied(rng, shape):
    """Small integers: very many equal scores, and exact in every dtype."""
    return rng.integers(-2, 3, shape).astype(np.float32)


def random_exclusions(rng, B, n, most=6):
    counts = rng.integers(0, most + 1, B)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, rng.integers(0, n, int(indptr[-1])).astype(np.int64)   # repeats allowed, as in topk


def assert_same(got, want):
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].tobytes() == want[0].tobytes()   # bit for bit, padding included


# ---- no Ray needed ------------------------------------------------------------------------------

@in_parent
def test_core_package_never_imports_ray():
    code = ("import sys, recscore, recscore.engine, recscore.kernels, recscore.cli; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@in_parent
def test_missing_ray_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import numpy as np, recscore.distributed as rd\n"
            "try:\n    rd.ShardedIndex.from_array(np.zeros((4, 2), np.float32), 2)\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install 'recscore[ray]'" in out


@in_parent
def test_merge_orders_like_the_kernel(rng):
    """The merge alone, over shard answers computed without Ray, on random splits."""
    for trial in range(60):
        n, d, B, k = int(rng.integers(1, 200)), int(rng.integers(1, 9)), int(rng.integers(0, 6)), int(rng.integers(1, 30))
        metric = METRICS[trial % 3]
        corpus, queries = tied(rng, (n, d)), tied(rng, (B, d))
        exclude = random_exclusions(rng, B, n)
        bounds = rd._bounds(n, int(rng.integers(1, 7)), None)
        parts = rd.split_exclusions(*exclude, bounds)
        answers = []
        for s in range(len(bounds) - 1):
            shard = rd.Shard(("rows", "fp32", (bounds[s + 1] - bounds[s], d), corpus[bounds[s]:bounds[s + 1]], None, None),
                             bounds[s], metric)
            answers.append(shard.search(queries, k, parts[s])[1:])
        assert_same(rd.merge_topk(answers, k, metric, B), topk(queries, corpus, k, metric=metric, exclude=exclude))


# ---- sharded retrieval ---------------------------------------------------------------------------

@in_ray_process
@pytest.mark.parametrize("dtype", DTYPES)
def test_sharded_topk_equals_single_machine(cluster, rng, dtype):
    n, d = 1500, 20
    corpus = tied(rng, (n, d))
    corpus[rng.integers(0, n, 200)] = corpus[0]              # repeated rows: exact ties across shards
    corpus[rng.integers(0, n, 30)] = 0                         # zero rows (cosine scores 0)
    table = quantize_rows(corpus, dtype)
    bounds = [0, 7, 7, 700, n]                                 # uneven, one shard empty, one of 7 rows
    with rd.ShardedIndex.from_array(table, bounds=bounds) as index:
        assert index.num_shards == 4 and len(index) == n
        for B in (1, 3, 9):                                    # the scan's one-query and register-block paths
            queries = tied(rng, (B, d))
            for metric in METRICS:
                for k in (1, 10, 40, 2000):                    # k past a shard's size and past the corpus
                    exclude = random_exclusions(rng, B, n, most=60) if k != 1 else None
                    want = topk(queries, table, k, metric=metric, exclude=exclude)
                    assert_same(index.topk(queries, k, metric=metric, exclude=exclude), want)


@in_ray_process
def test_sharded_float_arrays_and_tensor_queries(cluster, rng):
    torch = pytest.importorskip("torch")
    corpus = tied(rng, (900, 12)).astype(np.float16)
    queries = tied(rng, (5, 12))
    with rd.ShardedIndex.from_array(corpus, 3, metric="l2") as index:
        assert_same(index.topk(queries, 25), topk(queries, corpus, 25, metric="l2"))
        scores, ids = index.topk(torch.from_numpy(queries), 25)
        want = topk(torch.from_numpy(queries), corpus, 25, metric="l2")
        assert isinstance(ids, torch.Tensor) and torch.equal(ids, want[1]) and torch.equal(scores, want[0])
        assert index.topk(np.zeros((0, 12), np.float32), 4)[1].shape == (0, 4)


@in_ray_process
def test_sharded_errors_match_topk(cluster, rng):
    corpus = tied(rng, (50, 4))
    with rd.ShardedIndex.from_array(corpus, 2) as index:
        q = tied(rng, (2, 4))
        with pytest.raises(ValueError, match="k must be >= 1"):
            index.topk(q, 0)
        with pytest.raises(TypeError, match="k must be an integer"):
            index.topk(q, 2.0)
        with pytest.raises(ValueError, match="d = 5"):
            index.topk(tied(rng, (2, 5)), 3)
        with pytest.raises(ValueError, match="queries contains NaN"):
            index.topk(np.full((1, 4), np.nan, np.float32), 3)
        with pytest.raises(IndexError, match="excluded_ids\\[1\\] = 50"):
            index.topk(q, 3, exclude=(np.array([0, 1, 2]), np.array([3, 50])))
        with pytest.raises(ValueError, match="metric must be one of"):
            index.topk(q, 3, metric="dot")
        with pytest.raises(TypeError, match="queries must be a NumPy array"):
            index.topk([[1.0, 2.0, 3.0, 4.0]], 3)
        with pytest.raises(ValueError, match="ids must be >= 0"):
            index.add(np.array([-1]), np.zeros((1, 4), np.float32))
        with pytest.raises(ValueError, match="vectors must have shape"):
            index.add(np.array([60]), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="bounds must rise"):
        rd.ShardedIndex.from_array(corpus, bounds=[0, 30, 20, 50])
    with pytest.raises(ValueError, match="num_shards must be >= 1"):
        rd.ShardedIndex.from_array(corpus, 0)


@in_ray_process
def test_sharded_bundle_vectors(cluster, tmp_path, rng):
    path = build_small(tmp_path / "b")
    from recscore.bundle import open_bundle
    vectors = np.array(open_bundle(path).arrays["puresvd.safetensors"]["item_vectors"])
    queries = rng.standard_normal((6, vectors.shape[1])).astype(np.float32)
    with rd.ShardedIndex.from_bundle(path, 3) as index:
        assert [i["rows"] for i in index.info()] == list(np.diff(rd._bounds(len(vectors), 3, None)))
        exclude = random_exclusions(rng, 6, len(vectors), most=30)
        assert_same(index.topk(queries, 17, exclude=exclude), topk(queries, vectors, 17, exclude=exclude))
    with rd.ShardedIndex.from_bundle(path, 2, dtype="int8", metric="cosine") as index:
        table = quantize_rows(vectors, "int8")
        assert_same(index.topk(queries, 9), topk(queries, table, 9, metric="cosine"))
    (path / "puresvd.safetensors").write_bytes(b"x" * 64)
    with pytest.raises(rd.ShardUnavailable, match="sha256"):
        rd.ShardedIndex.from_bundle(path, 2)


class Reference:
    """The single-machine answer for a live catalogue: kernel topk over the live ids in increasing order."""

    def __init__(self, corpus, dtype):
        self.vectors = {i: v for i, v in enumerate(corpus)}
        self.dtype = dtype

    def add(self, ids, vectors):
        self.vectors.update(zip(ids.tolist(), vectors))

    def remove(self, ids):
        for i in ids.tolist():
            self.vectors.pop(i, None)

    def snapshot(self):
        return dict(self.vectors)

    @staticmethod
    def topk(vectors, dtype, queries, k, metric, exclude=None):
        ids = np.array(sorted(vectors), np.int64)
        table = quantize_rows(np.stack([vectors[i] for i in ids.tolist()]), dtype)
        row_exclude = None
        if exclude is not None:   # excluded ids -> rows of the live ids (gone ids dropped)
            indptr, excluded = exclude
            at = np.searchsorted(ids, excluded)
            found = (at < len(ids)) & (ids[np.minimum(at, len(ids) - 1)] == excluded)
            kept = np.concatenate([[0], np.cumsum(found)])[indptr]
            row_exclude = (kept.astype(np.int64), at[found].astype(np.int64))
        scores, rows = topk(queries, table, k, metric=metric, exclude=row_exclude)
        return scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


@in_ray_process
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_live_adds_and_removes(cluster, rng, dtype):
    n, d = 600, 8
    corpus = tied(rng, (n, d))
    reference = Reference(corpus, dtype)
    with rd.ShardedIndex.from_array(quantize_rows(corpus, dtype), 3) as index:
        queries = tied(rng, (4, d))
        steps = [("add", np.array([600, 601, 950]), tied(rng, (3, d))),        # new ids: the last shard
                 ("add", np.array([3, 250, 599, 601]), tied(rng, (4, d))),     # replacements on every shard
                 ("remove", np.array([0, 250, 400, 950, 10_000]), None),       # 10_000: unknown, ignored
                 ("add", np.array([0, 950]), tied(rng, (2, d))),               # removed ids come back
                 ("remove", np.arange(200, 400), None)]                        # a whole shard empty
        for epoch, (op, ids, vectors) in enumerate(steps, 1):
            if op == "add":
                assert index.add(ids, vectors) == epoch
                reference.add(ids, vectors)
            else:
                live = sum(1 for i in set(ids.tolist()) if i in reference.vectors)
                assert index.remove(ids) == live
                reference.remove(ids)
            assert len(index) == len(reference.vectors)
            for metric in METRICS:
                exclude = random_exclusions(rng, 4, 951, most=40)
                for k in (5, 300):
                    answer = index.search(queries, k, metric=metric, exclude=exclude)
                    assert answer.epoch == epoch
                    assert_same((answer.scores, answer.ids),
                                Reference.topk(reference.vectors, dtype, queries, k, metric, exclude))


@in_ray_process
def test_answers_never_mix_epochs(cluster, rng):
    """A writer adds while readers search: each answer equals the reference at the epoch it is stamped with."""
    n, d = 2000, 8
    corpus = tied(rng, (n, d))
    reference = Reference(corpus, "fp32")
    snapshots = {0: reference.snapshot()}
    queries = tied(rng, (3, d))
    answers = []
    with rd.ShardedIndex.from_array(corpus, 4) as index:
        def write():
            for step in range(12):
                ids = np.array([n + step, int(rng.integers(0, n))])
                vectors = np.full((2, d), 2.0, np.float32)      # the best possible rows: every answer moves
                epoch = index.add(ids, vectors)
                reference.add(ids, vectors)
                snapshots[epoch] = reference.snapshot()
        writer = threading.Thread(target=write)
        writer.start()
        while writer.is_alive() or len(answers) < 5:
            answers.append(index.search(queries, 30))
        writer.join()
    assert len({a.epoch for a in answers}) > 1
    for answer in answers:
        assert_same((answer.scores, answer.ids), Reference.topk(snapshots[answer.epoch], "fp32", queries, 30, "ip"))


@in_ray_process
def test_shard_out_of_step_is_refused(cluster, rng):
    corpus = tied(rng, (300, 4))
    with rd.ShardedIndex.from_array(corpus, 3, retries=2) as index:
        index.add(np.array([300]), np.ones((1, 4), np.float32))
        ray.get(index.shards[1].apply.remote(index.epoch + 1))      # a second writer moved one shard
        with pytest.raises(rd.EpochMismatch, match="different corpus epochs \\[1, 2\\]"):
            index.search(tied(rng, (2, 4)), 5)
        with pytest.raises(ray.exceptions.RayTaskError, match="two writers"):
            index.remove(np.array([1]))


def _heavy(rng):
    corpus = rng.standard_normal((120_000, 64)).astype(np.float32)
    return corpus, rng.standard_normal((1024, 64)).astype(np.float32)   # a query of about a second here


@in_ray_process
def test_killed_shard_mid_query_raises(cluster, rng):
    corpus, queries = _heavy(rng)
    with rd.ShardedIndex.from_array(corpus, 4, respawn=False) as index:
        pending = index.search_async(queries, 10)
        ray.kill(index.shards[2])
        with pytest.raises(rd.ShardUnavailable, match="shard 2 \\(ids 60000..89999\\) is gone during the query"):
            pending.result()


@in_ray_process
def test_killed_shard_mid_query_is_recreated(cluster, rng):
    corpus, queries = _heavy(rng)
    reference = Reference(corpus[:1], "fp32")   # only for its topk helper
    with rd.ShardedIndex.from_array(corpus, 4) as index:
        index.add(np.array([70_000, 200_000]), np.full((2, 64), 3.0, np.float32))   # lands on shards 2 and 3
        index.remove(np.array([60_001]))
        old = index.shards[2]
        pending = index.search_async(queries, 10)
        ray.kill(old)
        answer = pending.result()
        assert index.shards[2] is not old and answer.epoch == 2
        live = dict(enumerate(corpus))
        live.update({70_000: np.full(64, 3.0, np.float32), 200_000: np.full(64, 3.0, np.float32)})
        del live[60_001]
        want = reference.topk(live, "fp32", queries[:64], 10, "ip")
        assert_same((answer.scores[:64], answer.ids[:64]), want)


# ---- serving -----------------------------------------------------------------------------------------

@in_parent
def test_shared_state_between_engines(tmp_path):
    """Two engines on one database: one's feedback and forget_user reach the other's next request."""
    path = build_small(tmp_path / "b", config=dataclasses.replace(SMALL_CONFIG, scorer="puresvd"))
    a, b = rd.SharedEngine.open(path), rd.SharedEngine.open(path)
    try:
        first = b.recommend(5, 5)                      # b caches user 5
        item = int(first.items[0])
        stranger = 10_000                              # no history: scored by popularity
        before = b.score(stranger, [item])[0]
        a.feedback(5, item)
        assert item not in b.recommend(5, 5).items
        assert list(b.recommend(5, 5).items) == list(a.recommend(5, 5).items)
        assert b.score(stranger, [item])[0] == before + 1
        a.forget_user(5)
        assert b.recommend(5, 5).source == "popularity"   # the training history is gone for b too
        assert b.score(stranger, [item])[0] == before
        with pytest.raises(TypeError, match="SharedSQLiteState"):
            rd.SharedEngine.open(path, state=object())
    finally:
        a.close()
        b.close()


@in_ray_process
def test_serve_replicas_share_feedback(cluster, tmp_path):
    from ray import serve
    from recscore.engine import Engine
    from recscore.state import SQLiteState
    path = build_small(tmp_path / "b", config=dataclasses.replace(SMALL_CONFIG, scorer="puresvd"))
    serve.start(proxy_location="Disabled")
    handle = serve.run(rd.build_app({"bundle": str(path), "replicas": "2", "num_cpus": "0"}), name="recscore",
                       route_prefix=None)

    def on_every_replica(user, k=5):
        answers = {}
        for _ in range(200):
            answer = handle.recommend.remote(user, k).result()
            answers.setdefault(answer["replica"], []).append(answer["items"])
            if len(answers) == 2 and all(len(v) >= 2 for v in answers.values()):
                return answers
        raise AssertionError(f"requests reached {len(answers)} replica(s) of 2")

    try:
        warm = on_every_replica(5)                                   # both replicas cache user 5
        top = warm[next(iter(warm))][0][0]
        handle.feedback.remote(5, top).result()
        with Engine.open(path, state=SQLiteState(tmp_path / "check.db")) as check:   # one machine, same feedback
            check.feedback(5, top)
            want = [int(i) for i in check.recommend(5, 5).items]
        for answers in on_every_replica(5).values():
            assert all(items == want for items in answers)
        results = [handle.recommend.remote(u, 3) for u in range(1, 40)]   # concurrent: served in batches
        assert all(len(r.result()["items"]) == 3 for r in results)
        with pytest.raises(TypeError, match="user: ids are integers"):
            handle.recommend.remote("5", 3).result()
    finally:
        serve.delete("recscore")


@in_parent
def test_http_routes_of_a_replica(tmp_path):
    """EngineServer's HTTP answers, called in this process (the batching step run directly)."""
    import asyncio
    import json

    from starlette.requests import Request

    class Direct(rd.EngineServer):
        async def _batch(self, request):
            return (await self._recommend_batch([request]))[0]

    path = build_small(tmp_path / "b", config=dataclasses.replace(SMALL_CONFIG, scorer="puresvd"))
    server = Direct(str(path))

    def call(method, url, query="", body=None):
        payload = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""

        async def receive():
            return {"type": "http.request", "body": payload, "more_body": False}
        scope = {"type": "http", "method": method, "path": url, "query_string": query.encode(), "headers": []}
        response = asyncio.run(server(Request(scope, receive)))
        return response.status_code, json.loads(response.body)

    try:
        status, first = call("GET", "/recommend", "user=5&k=3")
        assert status == 200 and len(first["items"]) == 3 and first["source"] == "history"
        assert call("POST", "/feedback", body={"user": 5, "item": first["items"][0]})[0] == 200
        assert first["items"][0] not in call("GET", "/recommend", "user=5&k=3")[1]["items"]
        assert call("GET", "/recommend", "user=x") == (400, {"error": "user must be an integer, got 'x'"})
        assert call("GET", "/recommend", "user=5&k=0")[0] == 400
        assert call("POST", "/feedback", body={"user": 5, "item": 999_999})[0] == 404
        assert call("POST", "/feedback", body={"user": 5, "item": first["items"][1], "value": "nan"})[0] == 400
        assert call("POST", "/feedback", body=b"{not json")[0] == 400
        assert call("GET", "/nothing")[0] == 404
    finally:
        server.engine.close()


@in_ray_process
def test_serve_retrieval_over_shards(cluster, rng):
    """The retrieval stage behind Serve: concurrent single queries, batched, each equal to topk."""
    from ray import serve
    corpus = tied(rng, (3000, 16))
    with rd.ShardedIndex.from_array(corpus, 4) as index:
        serve.start(proxy_location="Disabled")
        handle = serve.run(rd.retrieval_deployment(2).bind(index), name="retrieval", route_prefix=None)
        try:
            queries = tied(rng, (40, 16))
            excluded = [rng.integers(0, 3000, int(rng.integers(0, 20))) for _ in range(40)]
            pending = [handle.topk.remote(queries[q], 12, excluded[q], "cosine" if q % 2 else None)
                       for q in range(40)]
            for q, response in enumerate(pending):
                scores, ids, epoch = response.result()
                indptr = np.array([0, len(excluded[q])], np.int64)
                want = topk(queries[q:q + 1], corpus, 12, metric="cosine" if q % 2 else "ip",
                            exclude=(indptr, excluded[q].astype(np.int64)))
                assert_same((scores[None], ids[None]), want)
                assert epoch == 0
            with pytest.raises(ValueError, match="query must be a vector of 16"):
                handle.topk.remote(np.zeros(3), 5).result()
        finally:
            serve.delete("retrieval")
