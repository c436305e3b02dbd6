"""`Engine`: an embeddable real-time recommender over a bundle (see bundle.py) and a state store.

    engine = Engine.open("ml.bundle")
    engine.recommend(414, k=10)                       # MovieLens userId -> movieIds, scores, timings
    engine.feedback(414, 2571, value=1.0)             # durable on return; the next recommend reflects it
    Engine.open("ml.bundle", llm="gemma3")            # + recommend(..., rerank="llm"), explain, explain_stream

A request: the user's history (bundle events + stored feedback) -> pooled row (one `embedding_bag`,
recency-weighted, cached per user and updated in place of a recompute on feedback) -> `topk` with
the seen items, genre filters and removed items as exclusions (scoring.py). Users with no history
get the most popular items. `text=` (a bundle built with --content) replaces that retrieval, history
or not: the text's MiniLM vector -> `topk` over the items' content vectors, same exclusions.
Thread-safe: catalogue and user entries are replaced, never mutated, under one lock; kernels run
outside it.
"""
import collections
import dataclasses
import math
import threading
import time
from pathlib import Path

import numpy as np

from recscore.kernels import topk

from .bundle import CONTENT_FILE, open_bundle
from .metrics import Metrics
from .scoring import FactorScorer, exclusion_csr, history_bags, recency, scorer_for, select_by_score
from .state import SQLiteState

STATE_FILE = "state.sqlite3"        # default state store, beside the bundle's files
USER_CACHE_SIZE = 100_000           # users whose history and pooled row stay in memory
RERANK_CANDIDATES = 20              # candidates the LLM re-ranks (at least k)
HISTORY_TITLES = 10                 # the LLM prompt holds the last 10 to 19 titles (see prompt_titles)
RERANK_WEIGHT = 0.2                 # share of the LLM's standardised score: best on validation (bench/rerank_quality.py)
EXPLAIN_TOKENS = 60
LLM_RUNTIMES = ("gemma3",)          # llm= names the engine loads itself, on first use
FILTER_KEYS = ("allow_genres", "deny_genres")


class FeatureUnavailable(RuntimeError):
    """A request needs a component that is not installed (the text encoder, the LLM runtime)."""


class UnknownItem(KeyError):
    pass


@dataclasses.dataclass
class Recommendation:
    items: np.ndarray        # int64 item ids (the data's own), best first; fewer than k if the catalogue ran out
    scores: np.ndarray       # float32
    timings_ms: dict         # per stage: history, score (text for text=), select, rerank (when asked), total
    source: str              # "history", "popularity" (a user with no history) or "text" (text=)
    titles: list             # the items' titles, as the catalogue held them when they were picked


@dataclasses.dataclass(frozen=True)
class _User:
    rows: np.ndarray         # int64 catalogue rows of the user's events, oldest first
    weights: np.ndarray      # float32 event weights (1 for training events, `value` for feedback)
    seen: np.ndarray         # sorted unique rows
    pooled: np.ndarray       # float32 (width,) pooled row, or None until first needed


@dataclasses.dataclass(frozen=True)
class _Catalogue:
    item_ids: np.ndarray     # int64 (N,) row -> item id
    row_of: dict             # item id -> row
    titles: list
    genres: np.ndarray       # bool (N, G)
    removed: np.ndarray      # sorted int64 rows no longer served


class Engine:
    def __init__(self, bundle, state, *, llm=None, encoder=None, cache_size=USER_CACHE_SIZE,
                 rerank_candidates=RERANK_CANDIDATES):
        """llm: None (no reranking or explanations), "gemma3" (the packaged Gemma 3 270M, loaded on first
        use), or an object like models.llm.LLM: score(prefix, candidates) -> [.mean log-probability] and
        stream(prompt, max_new_tokens) -> pieces of text.
        encoder: for text=, an object like models.minilm.Encoder (encode(text) -> (1, dim) normalised);
        default: the packaged MiniLM, created on the first text request."""
        if isinstance(llm, str) and llm not in LLM_RUNTIMES:
            raise ValueError(f"llm must be None, one of {LLM_RUNTIMES} or an LLM object, got {llm!r}")
        self.bundle = bundle
        self.config = bundle.config
        self.state = state
        self.llm_name = llm if isinstance(llm, str) else None
        self.llm = None if isinstance(llm, str) else llm
        self.encoder = encoder
        self.rerank_candidates = _count("rerank_candidates", rerank_candidates)
        self._llm_lock = threading.Lock()   # apart from _lock: a 0.8 s load must not stall recommend
        self._encoder_lock = threading.Lock()   # likewise for the encoder's load
        self.metrics = Metrics()
        self._lock = threading.RLock()
        self._cache_size = cache_size
        self._users = collections.OrderedDict()
        self._generation = collections.Counter()   # per user, bumped by writes: a load racing one is not cached
        self._filters = {}
        cat = bundle.arrays["catalogue.safetensors"]
        inter = bundle.arrays["interactions.safetensors"]
        self._base = (inter["user_ids"], inter["indptr"], inter["items"])
        item_ids = np.array(cat["item_ids"])
        self.genre_names = list(bundle.genre_names)
        genres = np.zeros((len(item_ids), len(self.genre_names)), bool)
        counts = np.diff(cat["genre_indptr"])
        genres[np.repeat(np.arange(len(item_ids)), counts), cat["genre_codes"]] = True
        self._catalogue = _Catalogue(item_ids, {int(i): r for r, i in enumerate(item_ids)}, list(bundle.titles),
                                     genres, np.zeros(0, np.int64))
        self._popularity = np.array(cat["popularity"], np.float32)
        for item, count in state.item_counts().items():
            row = self._catalogue.row_of.get(item)
            if row is not None:
                self._popularity[row] += count
        vectors = bundle.arrays["puresvd.safetensors"]["item_vectors"]
        ease = bundle.arrays["ease.safetensors"]
        self._item_vectors = vectors
        content = bundle.arrays.get(CONTENT_FILE)
        self._content_vectors = None if content is None else content["item_vectors"]
        self.scorer = scorer_for(self.config, vectors, ease["columns"], ease["weights"])

    @classmethod
    def open(cls, path, state=None, *, durability="process", **options):
        """Open a bundle (verified, mapped read-only) with a state store (default: SQLite beside it)."""
        bundle = open_bundle(path)
        if state is None:
            state = SQLiteState(Path(path) / STATE_FILE, durability=durability)
        return cls(bundle, state, **options)

    def close(self):
        self.state.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- users -----------------------------------------------------------------------------

    def _load_user(self, user):
        """_User from the bundle's events (unless forgotten) and the stored feedback."""
        catalogue = self._catalogue
        rows, weights = [], []
        user_ids, indptr, items = self._base
        at = np.searchsorted(user_ids, user)
        if at < len(user_ids) and user_ids[at] == user and not self.state.is_forgotten(user):
            rows.append(np.asarray(items[indptr[at]:indptr[at + 1]], np.int64))
            weights.append(np.ones(len(rows[0]), np.float32))
        events = [(catalogue.row_of[item], value) for item, value, _, _ in self.state.events(user)
                  if item in catalogue.row_of]
        if events:
            rows.append(np.array([r for r, _ in events], np.int64))
            weights.append(np.array([v for _, v in events], np.float32))
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        weights = np.concatenate(weights) if weights else np.zeros(0, np.float32)
        return _User(rows, weights, np.unique(rows), None)

    def _user(self, user):
        with self._lock:
            entry = self._users.get(user)
            if entry is not None:
                self._users.move_to_end(user)
        self.metrics.cache_lookup(entry is not None)
        if entry is None:
            with self._lock:
                generation = self._generation[user]
            entry = self._load_user(user)
            with self._lock:
                if self._generation[user] == generation:
                    entry = self._users.setdefault(user, entry)   # a racing loader's entry wins
                    while len(self._users) > self._cache_size:
                        self._users.popitem(last=False)
        return entry

    def _pooled(self, users, entries):
        """Pooled rows (B, width) of users with histories, computing the missing ones in one lookup."""
        missing = [b for b, e in enumerate(entries) if e.pooled is None]
        if missing:
            bags = history_bags([(entries[b].rows, entries[b].weights) for b in missing],
                                self.scorer.decay, self.scorer.max_history)
            pooled = self.scorer.pool(*bags)
            with self._lock:
                for j, b in enumerate(missing):
                    entries[b] = dataclasses.replace(entries[b], pooled=pooled[j])
                    if self._users.get(users[b]) is not None and self._users[users[b]].rows is entries[b].rows:
                        self._users[users[b]] = entries[b]
        return np.stack([e.pooled for e in entries])

    # ---- requests ----------------------------------------------------------------------------

    def recommend(self, user, k=10, *, exclude_seen=True, filters=None, text=None, rerank=None):
        """Top k items for `user` (the data's user id): a Recommendation.

        text: the items closest to these words (cosine of MiniLM vectors against the bundle's content
        vectors), in place of the history or popularity retrieval; the user's history still counts for
        exclude_seen. Items added live have no content vector, so text never returns them."""
        self._check_request_options(text, rerank)
        if text is not None:
            return self._recommend_text(user, k, exclude_seen, filters, text)
        reranker = self._llm("rerank='llm'", "score(prefix, candidates)") if rerank else None
        return self._recommend([user], k, exclude_seen, filters, reranker)[0]

    def recommend_many(self, users, k=10, *, exclude_seen=True, filters=None):
        """recommend for many users in one batched lookup and top-k: a list of Recommendation."""
        return self._recommend(list(users), k, exclude_seen, filters, None)

    def _check_request_options(self, text, rerank):
        if rerank not in (None, "llm"):
            raise ValueError(f"rerank must be None or 'llm', got {rerank!r}")
        if text is not None:
            if not isinstance(text, str):
                raise TypeError(f"text must be a str, got {type(text).__name__}")
            if not text.strip():
                raise ValueError("text must hold words, got an empty or blank str")
            if rerank:
                raise ValueError("text= and rerank='llm' cannot be combined: text replaces the candidates "
                                 "the LLM re-ranks")
            if self._content_vectors is None:
                raise FeatureUnavailable(f"text= needs the text encoder's item vectors in the bundle ({CONTENT_FILE}), "
                                         f"and this bundle has none: build it with `recscore build ... --content`")

    def _text_encoder(self):
        """The text encoder, created here on first use unless the engine was given one (once, by one
        thread: the others wait for it)."""
        if self.encoder is None:
            with self._encoder_lock:
                if self.encoder is None:
                    from .models.minilm import Encoder
                    self.encoder = Encoder()
        return self.encoder

    def _recommend_text(self, user, k, exclude_seen, filters, text):
        start = time.perf_counter()
        k = _count("k", k)
        entry = self._user(_as_id("user", user))
        catalogue = self._catalogue
        blocked = self._blocked_rows(filters, catalogue)
        history = time.perf_counter()
        query = np.asarray(self._text_encoder().encode(text), np.float32).reshape(1, -1)
        encoded = time.perf_counter()
        excluded = _merge(entry.seen if exclude_seen else None, blocked)
        # live-added rows lie past the content vectors: they are never candidates, so not exclusions
        excluded = excluded[excluded < len(self._content_vectors)]
        scores, rows = topk(query, self._content_vectors, k, metric="ip", exclude=exclusion_csr([excluded]))
        selected = time.perf_counter()
        timings = {"history": (history - start) * 1e3, "text": (encoded - history) * 1e3,
                   "select": (selected - encoded) * 1e3, "total": (selected - start) * 1e3}
        for stage, ms in timings.items():
            self.metrics.stage[stage].observe(ms / 1e3)
        self.metrics.requests.labels("recommend").inc()
        valid = rows[0] >= 0
        picked = rows[0][valid]
        return Recommendation(catalogue.item_ids[picked], scores[0][valid], timings, "text",
                              [catalogue.titles[r] for r in picked])

    def _llm(self, feature, needs):
        """The LLM runtime, loaded here on first use when the engine was given llm="gemma3" (once, by one
        thread: the others wait for it)."""
        if self.llm is None and self.llm_name is not None:
            with self._llm_lock:
                if self.llm is None:
                    try:
                        from .models.llm import LLM
                        self.llm = LLM.from_gguf()
                    except ImportError as error:   # gguf and the model ship in the extra "llm"
                        raise FeatureUnavailable(f"{feature} needs the LLM runtime, which is not installed "
                                                 f"({error}): pip install 'recscore[llm]'") from None
        if self.llm is None:
            raise FeatureUnavailable(f"{feature} needs the LLM runtime, and the LLM runtime is not installed "
                                     f"(pass llm=\"gemma3\" or an object with {needs})")
        return self.llm

    def _recommend(self, users, k, exclude_seen, filters, reranker):
        start = time.perf_counter()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        users = [_as_id("user", u) for u in users]
        catalogue = self._catalogue
        entries = [self._user(u) for u in users]
        blocked = self._blocked_rows(filters, catalogue)
        history = time.perf_counter()
        known = [b for b, e in enumerate(entries) if len(e.rows)]
        fresh = [b for b, e in enumerate(entries) if not len(e.rows)]
        wanted = max(k, self.rerank_candidates) if reranker else k
        scores = np.full((len(users), wanted), -np.inf, np.float32)
        rows = np.full((len(users), wanted), -1, np.int64)
        scored = time.perf_counter()
        if known:
            pooled = self._pooled([users[b] for b in known], [entries[b] for b in known])
            scored = time.perf_counter()
            excluded = [_merge(entries[b].seen if exclude_seen else None, blocked) for b in known]
            scores[known], rows[known] = self.scorer.select(pooled, wanted, excluded)
        if fresh:
            excluded = [_merge(entries[b].seen if exclude_seen else None, blocked) for b in fresh]
            scores[fresh], rows[fresh] = select_by_score(self._popularity[:len(catalogue.item_ids), None],
                                                         wanted, excluded)
        selected = time.perf_counter()
        timings = {"history": (history - start) * 1e3, "score": (scored - history) * 1e3,
                   "select": (selected - scored) * 1e3}
        if reranker:
            scores, rows = self._rerank(reranker, entries[0], scores[0], rows[0], k, catalogue)
            timings["rerank"] = (time.perf_counter() - selected) * 1e3
        timings["total"] = (time.perf_counter() - start) * 1e3
        for stage, ms in timings.items():
            self.metrics.stage[stage].observe(ms / 1e3)
        self.metrics.requests.labels("recommend").inc(len(users))
        out = []
        for b in range(len(users)):
            valid = rows[b, :k] >= 0
            picked = rows[b, :k][valid]
            out.append(Recommendation(catalogue.item_ids[picked], scores[b, :k][valid], timings,
                                      "history" if len(entries[b].rows) else "popularity",
                                      [catalogue.titles[r] for r in picked]))
        return out

    def _blocked_rows(self, filters, catalogue):
        """Sorted rows a request may not return: removed items and those its genre filters rule out."""
        if not filters:
            return catalogue.removed
        if not isinstance(filters, dict) or set(filters) - set(FILTER_KEYS):
            raise ValueError(f"filters must be a dict with keys among {FILTER_KEYS}, got {filters!r}")
        allow = frozenset(filters.get("allow_genres") or ())
        deny = frozenset(filters.get("deny_genres") or ())
        key = (allow, deny, id(catalogue))
        blocked = self._filters.get(key)
        if blocked is None:
            unknown = sorted((allow | deny) - set(self.genre_names))
            if unknown:
                raise ValueError(f"filters name unknown genre(s) {unknown}; the catalogue has {self.genre_names}")
            column = {g: c for c, g in enumerate(self.genre_names)}
            out = np.zeros(len(catalogue.item_ids), bool)
            if allow:
                out |= ~catalogue.genres[:, [column[g] for g in allow]].any(1)
            if deny:
                out |= catalogue.genres[:, [column[g] for g in deny]].any(1)
            out[catalogue.removed] = True
            blocked = np.flatnonzero(out).astype(np.int64)
            with self._lock:
                if len(self._filters) > 256:
                    self._filters.clear()
                self._filters[key] = blocked
        return blocked

    def score(self, user, items):
        """Scores of `items` (ids) for `user`: float32, NaN where the scorer has none (removed items, or
        items outside the item-item model's candidate columns)."""
        user = _as_id("user", user)
        catalogue = self._catalogue
        rows = np.array([self._row("items", i, catalogue) for i in items], np.int64)
        entry = self._user(user)
        if not len(entry.rows):
            out = self._popularity[rows].astype(np.float32)
        else:
            pooled = self._pooled([user], [entry])[0]
            if isinstance(self.scorer, FactorScorer):
                out = self.scorer.table.view()[rows] @ pooled
            else:
                columns = self.scorer.column_of(rows)
                out = np.where(columns >= 0, pooled[np.maximum(columns, 0)], np.nan).astype(np.float32)
        out[np.isin(rows, catalogue.removed)] = np.nan
        return out

    def similar_items(self, item, k=10):
        """Items an event on `item` raises most for any user: (item ids, scores)."""
        catalogue = self._catalogue
        row = self._row("item", item, catalogue)
        pooled = np.asarray(self.scorer.row(row), np.float32)[None]
        scores, rows = self.scorer.select(pooled, k, [_merge(np.array([row]), catalogue.removed)])
        valid = rows[0] >= 0
        return catalogue.item_ids[rows[0][valid]], scores[0][valid]

    # ---- writes --------------------------------------------------------------------------------

    def feedback(self, user, item, value=1.0, event="click", ts=None):
        """Record an event, durably (state.py) before returning; the user's next request reflects it.

        value: the event's weight relative to one training interaction (1.0); negative values push away.
        """
        self.feedback_many([(user, item, value, event, ts)])

    def feedback_many(self, events):
        """Record [(user, item, value, event, ts), ...] as `feedback` does, atomically: every event is
        checked first and all are stored in one transaction, so an error stores none of them."""
        start = time.perf_counter()
        now = time.time()
        checked = []
        for user, item, value, event, ts in events:
            user = _as_id("user", user)
            row = self._row("item", item, self._catalogue)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"value must be finite, got {value}")
            if not isinstance(event, str):
                raise TypeError(f"event must be a string, got {type(event).__name__}")
            ts = now if ts is None else float(ts)
            checked.append((user, int(item), row, value, event, ts))
        if not checked:
            return
        self.state.append_many([(user, item, value, event, ts) for user, item, _, value, event, ts in checked])
        with self._lock:
            for user, _, row, value, _, _ in checked:
                self._popularity[row] += 1.0
                self._generation[user] += 1
                entry = self._users.get(user)
                if entry is not None:
                    self._users[user] = self._with_event(entry, row, value)
        self.metrics.requests.labels("feedback").inc(len(checked))
        self.metrics.stage_seconds.labels("feedback").observe(time.perf_counter() - start)

    def _with_event(self, entry, row, value):
        """The user's entry after one more event: the pooled row updated exactly, not recomputed."""
        rows = np.append(entry.rows, row)
        weights = np.append(entry.weights, np.float32(value))
        seen = entry.seen if row in entry.seen else np.insert(entry.seen, np.searchsorted(entry.seen, row), row)
        pooled = entry.pooled
        if pooled is not None:
            decay, window = np.float32(self.scorer.decay), self.scorer.max_history
            pooled = decay * pooled + np.float32(value) * self.scorer.row(row)
            if len(entry.rows) >= window:   # the oldest event in the window drops out
                dropped = len(entry.rows) - window
                pooled -= entry.weights[dropped] * recency(window + 1, decay)[0] * self.scorer.row(entry.rows[dropped])
        return _User(rows, weights, seen, pooled)

    def forget_user(self, user):
        """Delete everything stored about the user; their training history is no longer used."""
        user = _as_id("user", user)
        events = self.state.events(user)
        self.state.forget_user(user)
        with self._lock:
            for item, _, _, _ in events:
                row = self._catalogue.row_of.get(item)
                if row is not None:
                    self._popularity[row] -= 1.0
            self._generation[user] += 1
            self._users.pop(user, None)

    def add_items(self, ids, titles=None, genres=None, vectors=None):
        """Add items to the live catalogue. vectors: (n, rank) in the PureSVD space (zeros if None).

        New items are candidates of a PureSVD engine at once; an EASE blend scores only the columns it
        was fitted on, so there they are found through popularity and feedback until the next build.
        """
        ids = [_as_id("ids", i) for i in ids]
        n = len(ids)
        rank = self._item_vectors.shape[1]
        with np.errstate(over="ignore"):   # a value past float32 becomes inf, refused just below
            vectors = np.zeros((n, rank), np.float32) if vectors is None else np.asarray(vectors, np.float32)
        if vectors.shape != (n, rank) or not np.isfinite(vectors).all():
            raise ValueError(f"vectors must be finite, of shape ({n}, {rank}), got {vectors.shape}")
        titles = list(titles) if titles is not None else [str(i) for i in ids]
        genres = list(genres) if genres is not None else [[] for _ in ids]
        if len(titles) != n or len(genres) != n:
            raise ValueError("titles and genres must have one entry per id")
        with self._lock:
            old = self._catalogue
            taken = [i for i in ids if i in old.row_of] or [i for i in set(ids) if ids.count(i) > 1]
            if taken:
                raise ValueError(f"ids already in the catalogue (or repeated): {taken[:5]}")
            for g in {g for gs in genres for g in gs} - set(self.genre_names):
                self.genre_names.append(g)
            new_genres = np.zeros((n, len(self.genre_names)), bool)
            for j, gs in enumerate(genres):
                new_genres[j, [self.genre_names.index(g) for g in gs]] = True
            old_genres = np.pad(old.genres, ((0, 0), (0, len(self.genre_names) - old.genres.shape[1])))
            if isinstance(self.scorer, FactorScorer):
                self.scorer.add_rows(vectors)
            else:
                self.scorer.add_rows(self.config.svd_weight * (vectors @ self._item_vectors[self.scorer.columns].T))
            self._item_vectors = np.concatenate([self._item_vectors, vectors])
            self._popularity = np.concatenate([self._popularity, np.zeros(n, np.float32)])
            row_of = dict(old.row_of)
            row_of.update((i, len(old.item_ids) + j) for j, i in enumerate(ids))
            self._catalogue = _Catalogue(np.concatenate([old.item_ids, np.array(ids, np.int64)]), row_of,
                                         old.titles + titles, np.concatenate([old_genres, new_genres]), old.removed)

    def remove_items(self, ids):
        """Stop serving items (they stay in users' histories); returns how many were removed."""
        with self._lock:
            old = self._catalogue
            rows = np.array(sorted({old.row_of[i] for i in map(int, ids) if i in old.row_of}), np.int64)
            fresh = np.setdiff1d(rows, old.removed)
            if isinstance(self.scorer, FactorScorer):
                self.scorer.remove_rows(fresh)
            self._catalogue = dataclasses.replace(old, removed=np.union1d(old.removed, fresh))
        return len(fresh)

    # ---- the LLM hooks -------------------------------------------------------------------------

    def _rerank(self, llm, entry, scores, rows, k, catalogue):
        """The candidates re-ordered by a blend of their scores and the LLM's: all candidates in one
        batched score call after the user's history prompt (the same prefix for the user's next
        request, so the LLM's prefix cache runs none of it again)."""
        valid = rows >= 0
        rows, scores = rows[valid], scores[valid]
        if not len(rows):
            return scores[None], rows[None]
        titles = [catalogue.titles[r] for r in rows]
        scored = llm.score(llm_prompt_prefix(prompt_titles(entry.rows, catalogue.titles)), [" " + t for t in titles])
        # per-token mean: a total log-probability would favour short titles
        llm_scores = np.array([s.mean for s in scored], np.float64)
        blended = blend_scores(scores, llm_scores, RERANK_WEIGHT)
        order = np.argsort(-blended, kind="stable")[:k]
        return blended[order][None].astype(np.float32), rows[order][None]

    def explain(self, user, item):
        """A one-paragraph reason, generated by the LLM runtime, why `item` suits `user`."""
        return "".join(self.explain_stream(user, item))

    def explain_stream(self, user, item):
        """explain's text as the LLM generates it: an iterator of pieces. The user, the item and the
        runtime are checked here, before the first piece. Iterate it on one thread and to its end (or
        close it): the LLM serves no other call meanwhile."""
        catalogue = self._catalogue
        row = self._row("item", item, catalogue)
        entry = self._user(_as_id("user", user))
        llm = self._llm("explain", "stream(prompt, max_new_tokens)")
        prompt = explain_prompt(prompt_titles(entry.rows, catalogue.titles), catalogue.titles[row])
        return llm.stream(prompt, max_new_tokens=EXPLAIN_TOKENS)

    # ---- helpers -------------------------------------------------------------------------------

    def _row(self, name, item, catalogue):
        row = catalogue.row_of.get(_as_id(name, item))
        if row is None:
            raise UnknownItem(f"{name}: item {item} is not in the catalogue")
        return row

    @property
    def num_items(self):
        return len(self._catalogue.item_ids) - len(self._catalogue.removed)

    def title(self, item):
        return self._catalogue.titles[self._row("item", item, self._catalogue)]


def prompt_titles(rows, titles):
    """The titles of a user's LLM prompt from their event rows (oldest first): the last HISTORY_TITLES
    to 2 HISTORY_TITLES - 1, from a start that moves HISTORY_TITLES at a time, so that a feedback event
    appends one title to the prompt (the LLM's prefix cache then runs only the new tokens) rather than
    sliding it."""
    start = max(0, len(rows) - HISTORY_TITLES) // HISTORY_TITLES * HISTORY_TITLES
    return [titles[r] for r in rows[start:]]


def llm_prompt_prefix(history_titles):
    """The prompt the LLM continues with each candidate title: the user's recent items, newest last."""
    lines = "\n".join(f"- {t}" for t in history_titles)
    return f"A viewer recently enjoyed these movies, most recent last:\n{lines}\nThe next movie they will enjoy is:"


def explain_prompt(history_titles, title):
    """The rerank prompt continued with `title`: after a rerank, the LLM's prefix cache holds all but the tail."""
    return f"{llm_prompt_prefix(history_titles)} {title}\nIn two sentences, explain why they would enjoy {title}:\n"


def blend_scores(cf_scores, llm_scores, weight):
    """(1 - weight) z(cf) + weight z(llm), each standardised over the candidates (constant -> 0)."""
    def z(x):
        x = np.asarray(x, np.float64)
        spread = x.std()
        return (x - x.mean()) / spread if spread > 0 else np.zeros_like(x)
    return (1.0 - weight) * z(cf_scores) + weight * z(llm_scores)


def _merge(seen, blocked):
    """One exclusion list (topk takes repeated ids; sorting them would cost more than the top-k)."""
    if seen is None or not len(seen):
        return blocked
    if not len(blocked):
        return seen
    return np.concatenate([seen, blocked])


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _as_id(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: ids are integers (the data's own ids), got {type(value).__name__} {value!r}")
    return int(value)
