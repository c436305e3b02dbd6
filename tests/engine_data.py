"""Small synthetic data sets and bundles for the engine tests (test_engine_*.py)."""
from recscore import bundle, train
from recscore.datasets import synthetic_events

SMALL_CONFIG = train.ServingConfig(min_support=2, svd_rank=16, ease_lambda=20.0, max_history=16)
GENRES = ("Drama", "Comedy", "Horror")


def small_catalogue_and_events(num_items=200, num_users=80, seed=3):
    """A Catalogue with ids 1000 + row and events (users 1..U) from the synthetic demo data."""
    return synthetic_events(num_items=num_items, num_users=num_users, seed=seed, genre_names=GENRES)


def build_small(path, config=SMALL_CONFIG, **options):
    catalogue, events = small_catalogue_and_events(**options)
    bundle.build(catalogue, events, path, config=config, tune=False, log=lambda *_: None)
    return path
