"""Small synthetic data sets and bundles for the engine tests (test_engine_*.py)."""
import numpy as np

from recscore import bundle, train
from recscore.datasets import synthetic_catalogue

SMALL_CONFIG = train.ServingConfig(min_support=2, svd_rank=16, ease_lambda=20.0, max_history=16)
GENRES = ("Drama", "Comedy", "Horror")


def small_catalogue_and_events(num_items=200, num_users=80, seed=3):
    """A Catalogue with ids 1000 + row and events (users 1..U) from the synthetic demo data."""
    data = synthetic_catalogue(num_items=num_items, num_users=num_users, dim=8, seed=seed, progress=False)
    ids = 1000 + np.arange(num_items)
    genres = [[GENRES[i % 3]] + ([GENRES[(i + 1) % 3]] if i % 5 == 0 else []) for i in range(num_items)]
    catalogue = bundle.Catalogue(ids, data.titles, genres)
    counts = np.diff(data.history_indptr)
    users = np.repeat(np.arange(1, num_users + 1), counts)
    position = np.arange(len(users)) - data.history_indptr[users - 1]
    items = ids[data.history_items]
    values = np.full(len(users), 4.0)
    times = 1_000_000 + 60 * position + users
    return catalogue, (users, items, values, times)


def build_small(path, config=SMALL_CONFIG, **options):
    catalogue, events = small_catalogue_and_events(**options)
    bundle.build(catalogue, events, path, config=config, tune=False, log=lambda *_: None)
    return path
