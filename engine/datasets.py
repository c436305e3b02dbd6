"""Catalogues the engine runs on: a deterministic synthetic one (the demo's default) and MovieLens.

A catalogue is items (titles, categories, optional latent factors) plus users' histories
in CSR form: user u's items are `history_items[history_indptr[u]:history_indptr[u+1]]`,
oldest first, with one weight (rating or 1) each. CSR is what the kernels take as bag
offsets and as exclusion lists alike.
"""
import csv
import dataclasses
from pathlib import Path

import numpy as np
from tqdm import tqdm


@dataclasses.dataclass
class Catalogue:
    titles: list                      # item id -> title
    categories: list                  # item id -> category label
    history_indptr: np.ndarray        # int64 (U + 1,)
    history_items: np.ndarray         # int64 item ids, oldest first within each user
    history_weights: np.ndarray       # float32, one per history entry
    item_factors: np.ndarray = None   # float32 (N, d) when the catalogue comes with them

    @property
    def num_items(self):
        return len(self.titles)

    @property
    def num_users(self):
        return len(self.history_indptr) - 1

    def history(self, user):
        start, end = self.history_indptr[user], self.history_indptr[user + 1]
        return self.history_items[start:end]


_GENRES = {
    "Space Opera": (["Stellar", "Void", "Orbital", "Quantum", "Nebula"], ["Armada", "Frontier", "Drift", "Colony", "Signal"]),
    "Noir": (["Midnight", "Rainy", "Crooked", "Silent", "Neon"], ["Alibi", "Precinct", "Ledger", "Witness", "Alley"]),
    "Romance": (["Summer", "Paper", "Second", "Golden", "Tender"], ["Letters", "Promise", "Harbour", "Waltz", "Garden"]),
    "Horror": (["Hollow", "Crimson", "Pale", "Buried", "Howling"], ["Manor", "Ritual", "Cellar", "Orchard", "Choir"]),
    "Documentary": (["Hidden", "Frozen", "Urban", "Ancient", "Deep"], ["Rivers", "Empires", "Forests", "Machines", "Reefs"]),
    "Animation": (["Little", "Brave", "Clockwork", "Cosmic", "Wobbly"], ["Robot", "Dragon", "Kitchen", "Balloon", "Fox"]),
    "Western": (["Dusty", "Last", "Iron", "Lonesome", "Copper"], ["Canyon", "Sheriff", "Railroad", "Saloon", "Trail"]),
    "Thriller": (["Zero", "Double", "Cold", "Final", "Broken"], ["Protocol", "Cipher", "Exchange", "Hour", "Asset"]),
}


def synthetic_catalogue(num_items=20_000, num_users=2_000, dim=32, seed=7, progress=True):
    """Items with latent factors around their genre's centre; users who favour one to three genres.

    Deterministic for a given seed. A user's history is drawn from a softmax of their taste
    vector against the items, so pooled histories carry real signal for retrieval.
    """
    rng = np.random.default_rng(seed)
    genres = list(_GENRES)
    centres = rng.standard_normal((len(genres), dim)).astype(np.float32)
    item_genre = rng.integers(0, len(genres), num_items)
    factors = (centres[item_genre] + 0.6 * rng.standard_normal((num_items, dim))).astype(np.float32)
    titles, categories = [], []
    for item, g in enumerate(item_genre):
        adjectives, nouns = _GENRES[genres[g]]
        titles.append(f"{adjectives[item % 5]} {nouns[(item // 5) % 5]} {item // 25 + 1}")
        categories.append(genres[g])

    # Each user favours one to three genres; a history is a draw without replacement from the
    # softmax of taste . item, done for a chunk of users at once with the Gumbel-top-k trick.
    lengths = rng.integers(3, 60, num_users)
    histories = []
    for start in tqdm(range(0, num_users, 250), desc="users", unit="chunk", disable=not progress):
        count = min(250, num_users - start)
        favourite = rng.random((count, len(genres))) < rng.integers(1, 4, (count, 1)) / len(genres)
        favourite[np.arange(count), rng.integers(0, len(genres), count)] = True
        tastes = (favourite @ centres) / favourite.sum(axis=1, keepdims=True)
        tastes += 0.3 * rng.standard_normal((count, dim)).astype(np.float32)
        keys = (tastes @ factors.T) / 2.0 + rng.gumbel(size=(count, num_items)).astype(np.float32)
        best = np.argpartition(-keys, 60, axis=1)[:, :60]
        best = np.take_along_axis(best, np.argsort(-np.take_along_axis(keys, best, axis=1), axis=1), axis=1)
        histories.extend(best[u, :lengths[start + u]] for u in range(count))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate(histories).astype(np.int64)
    return Catalogue(titles, categories, indptr, items, np.ones(len(items), dtype=np.float32), factors)


def load_movielens(path):
    """MovieLens latest-small from its folder (ratings.csv, movies.csv). Item ids are re-numbered 0..N-1
    in movies.csv order; histories are sorted by timestamp (ties by movie id)."""
    path = Path(path)
    if not (path / "ratings.csv").exists() or not (path / "movies.csv").exists():
        raise FileNotFoundError(f"{path} does not look like MovieLens: ratings.csv and movies.csv are needed")
    movie_ids, titles, categories = [], [], []
    with open(path / "movies.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            movie_ids.append(int(row["movieId"]))
            titles.append(row["title"])
            categories.append(row["genres"].replace("|", ", "))
    item_of_movie = {m: i for i, m in enumerate(movie_ids)}
    ratings = np.loadtxt(path / "ratings.csv", delimiter=",", skiprows=1,
                         dtype=[("user", np.int64), ("movie", np.int64), ("rating", np.float32), ("time", np.int64)])
    items = np.fromiter((item_of_movie[m] for m in ratings["movie"]), dtype=np.int64, count=len(ratings))
    _, users = np.unique(ratings["user"], return_inverse=True)
    order = np.lexsort((items, ratings["time"], users))
    counts = np.bincount(users, minlength=users.max() + 1)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Catalogue(titles, categories, indptr, items[order], ratings["rating"][order].astype(np.float32))


def hold_out_last(catalogue):
    """Leave-last-out split: each user's latest item (if they have two or more) becomes the test item.

    Returns (train Catalogue, test_users int64, test_items int64).
    """
    counts = np.diff(catalogue.history_indptr)
    test_users = np.flatnonzero(counts >= 2)
    last = catalogue.history_indptr[test_users + 1] - 1
    keep = np.ones(len(catalogue.history_items), dtype=bool)
    keep[last] = False
    train_counts = counts.copy()
    train_counts[test_users] -= 1
    train = dataclasses.replace(
        catalogue,
        history_indptr=np.concatenate([[0], np.cumsum(train_counts)]).astype(np.int64),
        history_items=catalogue.history_items[keep],
        history_weights=catalogue.history_weights[keep])
    return train, test_users, catalogue.history_items[last]


def synthetic_events(num_items=200, num_users=80, dim=8, seed=3, genre_names=None, progress=False):
    """synthetic_catalogue as data for `bundle.build`: a bundle.Catalogue (ids 1000 + row, the titles, each
    item's own genre, or with genre_names every item in genre_names[row % n] and every fifth also in the
    next) and events (users 1..U, value 4.0, a minute apart in history order)."""
    from .bundle import Catalogue

    data = synthetic_catalogue(num_items=num_items, num_users=num_users, dim=dim, seed=seed, progress=progress)
    ids = 1000 + np.arange(num_items)
    if genre_names is None:
        genres = [[category] for category in data.categories]
    else:
        n = len(genre_names)
        genres = [[genre_names[i % n]] + ([genre_names[(i + 1) % n]] if i % 5 == 0 else [])
                  for i in range(num_items)]
    catalogue = Catalogue(ids, data.titles, genres)
    counts = np.diff(data.history_indptr)
    users = np.repeat(np.arange(1, num_users + 1), counts)
    position = np.arange(len(users)) - data.history_indptr[users - 1]
    items = ids[data.history_items]
    values = np.full(len(users), 4.0)
    times = 1_000_000 + 60 * position + users
    return catalogue, (users, items, values, times)
