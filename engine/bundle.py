"""The bundle: a directory that holds everything the engine serves, written by `recscore build`.

    manifest.json            format, schema version, counts, cleaning report, models, serving
                             config, and for every other file its sha256, size and arrays (dtype, shape)
    items.json               titles and the genre vocabulary
    catalogue.safetensors    item_ids, popularity, genre_indptr / genre_codes (CSR of genres per item)
    interactions.safetensors user_ids, indptr, items, values, times (training events, CSR by user)
    puresvd.safetensors      item_vectors (N, rank)
    ease.safetensors         columns (the support S), weights (|S|, |S|)
    content.safetensors      optional (`build --content`): item_vectors (N, 384), the MiniLM text
                             encoder's L2-normalised vectors of item_text ("title | genres")

No pickle anywhere: arrays are safetensors, text is JSON. `open_bundle` checks the manifest and
every file's hash, then maps the arrays read-only (np.memmap at the offsets of the safetensors
header, so nothing is copied); a damaged or foreign bundle raises ValueError naming the file.
Data ids are int64 (MovieLens userId / movieId, or the integers of a generic CSV).
"""
import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from . import train

FORMAT = "recscore-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ITEMS_JSON = "items.json"
ARRAY_FILES = ("catalogue.safetensors", "interactions.safetensors", "puresvd.safetensors", "ease.safetensors")
CONTENT_FILE = "content.safetensors"
OPTIONAL_ARRAY_FILES = (CONTENT_FILE,)   # checked and mapped when the manifest lists them
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
HASH_CHUNK = 1 << 20
MOVIELENS_VALUE_RANGE = (0.5, 5.0)
CLEANING_KEYS = ("rows", "malformed", "unknown_item", "out_of_range", "duplicate", "kept")


# ---- reading data ---------------------------------------------------------------------------

class Catalogue:
    """Items of a data set: int64 ids, titles, and each item's genres (lists of str)."""

    def __init__(self, ids, titles, genres):
        self.ids = np.asarray(ids, np.int64)
        self.titles = list(titles)
        self.genres = [list(g) for g in genres]
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("the items file lists an item id twice")


def read_items_csv(path, id_column="item", title_column="title", genres_column="genres"):
    """Catalogue from a CSV with a header: id, title, genres separated by '|'."""
    ids, titles, genres = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {id_column, title_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for line, row in enumerate(reader, 2):
            try:
                ids.append(int(row[id_column]))
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {line}: item id {row[id_column]!r} is not an integer") from None
            titles.append(row[title_column])
            text = row.get(genres_column) or ""
            genres.append([g for g in text.split("|") if g and g != "(no genres listed)"])
    return Catalogue(ids, titles, genres)


def read_events_csv(path, columns=("user", "item", "value", "timestamp")):
    """(users, items, values, times, malformed count) from a CSV with a header naming `columns`."""
    users, items, values, times = [], [], [], []
    malformed = 0
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or any(c not in header for c in columns):
            raise ValueError(f"{path}: the header must name the columns {list(columns)}, found {header}")
        at = [header.index(c) for c in columns]
        for row in reader:
            try:
                u, i, v, t = (row[j] for j in at)
                u, i, v, t = int(u), int(i), float(v), int(float(t))
            except (ValueError, IndexError):
                malformed += 1
                continue
            users.append(u)
            items.append(i)
            values.append(v)
            times.append(t)
    return (np.array(users, np.int64), np.array(items, np.int64), np.array(values, np.float64),
            np.array(times, np.int64), malformed)


def clean_events(users, items, values, times, catalogue, value_range=None, malformed=0):
    """Drop and count what cannot be trusted: unknown items, values outside value_range (or not finite),
    repeated (user, item) pairs (the latest event is kept). Returns (events, report)."""
    report = dict.fromkeys(CLEANING_KEYS, 0)
    report["rows"] = len(users) + malformed
    report["malformed"] = malformed
    known = np.isin(items, catalogue.ids)
    report["unknown_item"] = int((~known).sum())
    in_range = np.isfinite(values)
    if value_range is not None:
        in_range &= (values >= value_range[0]) & (values <= value_range[1])
    report["out_of_range"] = int((known & ~in_range).sum())
    keep = known & in_range
    users, items, values, times = users[keep], items[keep], values[keep], times[keep]
    # Latest event per (user, item): order by pair, then time, then file order; keep each pair's last.
    order = np.lexsort((np.arange(len(users)), times, items, users))
    last = np.ones(len(order), bool)
    last[:-1] = (users[order][1:] != users[order][:-1]) | (items[order][1:] != items[order][:-1])
    report["duplicate"] = int((~last).sum())
    chosen = order[last]
    report["kept"] = len(chosen)
    return (users[chosen], items[chosen], values[chosen], times[chosen]), report


def interactions_of(users, items, values, times, catalogue):
    """(user_ids, train.Interactions): CSR by user (ids ascending), events by time then item row."""
    user_ids, user_rows = np.unique(users, return_inverse=True)
    order = np.argsort(catalogue.ids, kind="stable")
    rows = order[np.searchsorted(catalogue.ids, items, sorter=order)]
    by = np.lexsort((rows, times, user_rows))
    indptr = np.zeros(len(user_ids) + 1, np.int64)
    np.cumsum(np.bincount(user_rows, minlength=len(user_ids)), out=indptr[1:])
    return user_ids, train.Interactions(indptr, rows[by].astype(np.int64), values[by].astype(np.float32),
                                        times[by], len(catalogue.ids))


def read_movielens(path):
    """(catalogue, events, malformed) of a MovieLens folder (ratings.csv, movies.csv)."""
    path = Path(path)
    if not (path / "ratings.csv").exists() or not (path / "movies.csv").exists():
        raise FileNotFoundError(f"{path} does not look like MovieLens: ratings.csv and movies.csv are needed")
    catalogue = read_items_csv(path / "movies.csv", id_column="movieId")
    *events, malformed = read_events_csv(path / "ratings.csv", ("userId", "movieId", "rating", "timestamp"))
    return catalogue, events, malformed


# ---- building -----------------------------------------------------------------------------

def fit_models(interactions, config):
    """(item_vectors, ease columns, ease weights) of `config` on `interactions`."""
    vectors = train.svd_vectors(interactions, config.svd_rank)
    columns = train.support_of(interactions, config.min_support)
    weights = train.ease(train.gram(interactions, columns), config.ease_lambda)
    return vectors, columns, weights


def item_text(title, genres):
    """The text the content vectors encode for one item: "title | genre, genre"."""
    return f"{title} | {', '.join(genres)}" if genres else title


def content_vectors(catalogue, log=print):
    """float32 (N, 384): the MiniLM text encoder's vectors of every item's item_text."""
    from .models.minilm import Encoder

    started = time.perf_counter()
    vectors = Encoder().encode([item_text(t, g) for t, g in zip(catalogue.titles, catalogue.genres)])
    log(f"content vectors: {len(vectors):,} item texts encoded in {time.perf_counter() - started:.1f} s")
    return vectors


def build(catalogue, events, out_dir, *, value_range=None, malformed=0, config=None, tune=True, content=False,
          log=print):
    """Clean the events, choose the serving config on validation, fit the models on all events, write
    the bundle to out_dir. content: also write content.safetensors (the text encoder over item texts).
    Returns the manifest."""
    from .evaluate import ConfigEvaluator   # evaluation scores candidates with the served code path

    started = time.perf_counter()
    (users, items, values, times), report = clean_events(*events, catalogue, value_range, malformed)
    log("cleaning: " + ", ".join(f"{key} {report[key]:,}" for key in CLEANING_KEYS))
    if report["kept"] == 0:
        raise ValueError("no events left after cleaning")
    user_ids, interactions = interactions_of(users, items, values, times, catalogue)
    # before tuning: after it, MovieLens' encoding ran 23 s instead of 12 s (cause not yet found)
    text_vectors = content_vectors(catalogue, log) if content else None
    config = config or train.ServingConfig()
    validation = None
    if tune:
        # Tuning never sees the test part that `recscore eval` holds out: it splits the training part.
        tuning_set, _ = train.temporal_split(interactions)
        log(f"tuning on validation ({len(train.TUNING_GRID['ease_lambda']) * len(train.TUNING_GRID['svd_weight']) * len(train.TUNING_GRID['decay'])} configurations)")
        config, results = train.tune(tuning_set, ConfigEvaluator(), base=config)
        validation = dict(next(scores for c, scores in results if c == config))
        log(f"chosen: lambda {config.ease_lambda:g}, svd weight {config.svd_weight:g}, decay {config.decay:g} "
            f"(validation NDCG@20 {validation['ndcg@20']:.4f}, recall@20 {validation['recall@20']:.4f})")
    vectors, columns, weights = fit_models(interactions, config)
    write_bundle(out_dir, catalogue, user_ids, interactions, vectors, columns, weights, config, report, validation,
                 text_vectors)
    log(f"bundle written to {out_dir} in {time.perf_counter() - started:.1f} s: {len(user_ids):,} users, "
        f"{len(catalogue.ids):,} items, {len(interactions.items):,} events")
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def build_factor_bundle(catalogue, events, item_vectors, out_dir, *, config=None, value_range=None, log=print):
    """A bundle served by given item vectors alone (scorer "puresvd", no EASE: an empty support), for
    catalogues where the N x N item-item models and the dense PureSVD fit cannot be built (1M items).
    item_vectors: float32 (N, d), rows in catalogue order. config.index_dtype picks the rows the index
    scans ("fp32" or "int8"). Returns the manifest."""
    import dataclasses

    config = dataclasses.replace(config or train.ServingConfig(), scorer="puresvd")
    vectors = np.ascontiguousarray(item_vectors, np.float32)
    if vectors.ndim != 2 or len(vectors) != len(catalogue.ids) or not np.isfinite(vectors).all():
        raise ValueError(f"item_vectors must be finite, one row per item ({len(catalogue.ids)}), got {vectors.shape}")
    (users, items, values, times), report = clean_events(*events, catalogue, value_range)
    if report["kept"] == 0:
        raise ValueError("no events left after cleaning")
    user_ids, interactions = interactions_of(users, items, values, times, catalogue)
    write_bundle(out_dir, catalogue, user_ids, interactions, vectors, np.zeros(0, np.int64),
                 np.zeros((0, 0), np.float32), config, report)
    log(f"factor bundle written to {out_dir}: {len(user_ids):,} users, {len(catalogue.ids):,} items, "
        f"{len(interactions.items):,} events, d = {vectors.shape[1]}, index rows {config.index_dtype}")
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def write_bundle(out_dir, catalogue, user_ids, interactions, vectors, columns, weights, config, report,
                 validation=None, text_vectors=None):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = sorted({g for genres in catalogue.genres for g in genres})
    code_of = {g: c for c, g in enumerate(vocabulary)}
    genre_indptr = np.zeros(len(catalogue.ids) + 1, np.int64)
    np.cumsum([len(g) for g in catalogue.genres], out=genre_indptr[1:])
    genre_codes = np.array([code_of[g] for genres in catalogue.genres for g in genres], np.int32)
    arrays = {
        "catalogue.safetensors": {"item_ids": catalogue.ids, "popularity": train.popularity(interactions),
                                  "genre_indptr": genre_indptr, "genre_codes": genre_codes},
        "interactions.safetensors": {"user_ids": user_ids, "indptr": interactions.indptr,
                                     "items": interactions.items, "values": interactions.values,
                                     "times": interactions.times},
        "puresvd.safetensors": {"item_vectors": vectors},
        "ease.safetensors": {"columns": columns, "weights": weights},
    }
    if text_vectors is not None:
        arrays[CONTENT_FILE] = {"item_vectors": text_vectors}
    files = {}
    for name, tensors in arrays.items():
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out / name))
        files[name] = {"sha256": sha256_of(out / name), "bytes": (out / name).stat().st_size,
                       "arrays": {k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v))}
                                  for k, v in tensors.items()}}
    (out / ITEMS_JSON).write_text(json.dumps({"titles": catalogue.titles, "genres": vocabulary}), encoding="utf-8")
    files[ITEMS_JSON] = {"sha256": sha256_of(out / ITEMS_JSON), "bytes": (out / ITEMS_JSON).stat().st_size}
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION,
        "counts": {"users": len(user_ids), "items": len(catalogue.ids), "events": len(interactions.items),
                   "ease_columns": len(columns)},
        "dims": {"puresvd": int(vectors.shape[1]), "ease": len(columns)},
        "dtypes": {"item_vectors": "float32", "ease": "float32"},
        "models": {"puresvd": {"rank": int(vectors.shape[1])},
                   "ease": {"lambda": config.ease_lambda, "min_support": config.min_support}},
        "serving": config.as_dict(),
        "validation": validation,
        "cleaning": report,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- opening ------------------------------------------------------------------------------

class Bundle:
    """A verified bundle: `manifest`, `titles`, `genre_names`, and arrays[file][name] (read-only maps)."""

    def __init__(self, path, manifest, titles, genre_names, arrays):
        self.path = path
        self.manifest = manifest
        self.titles = titles
        self.genre_names = genre_names
        self.arrays = arrays

    @property
    def config(self):
        return train.ServingConfig(**self.manifest["serving"])

    def interactions(self):
        a = self.arrays["interactions.safetensors"]
        return train.Interactions(a["indptr"], a["items"], a["values"], a["times"], len(self.titles))


def open_bundle(path):
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{manifest_path}: not found; {path} is not a recscore bundle") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: not a recscore bundle manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{manifest_path}: schema version {manifest.get('schema_version')!r}, this recscore reads {SCHEMA_VERSION}")
    files = manifest.get("files", {})
    array_files = ARRAY_FILES + tuple(name for name in OPTIONAL_ARRAY_FILES if name in files)
    for name in array_files + (ITEMS_JSON,):
        entry = files.get(name)
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise ValueError(f"{manifest_path}: no entry for {name}")
        if not (path / name).is_file():
            raise ValueError(f"{path / name}: missing")
        if sha256_of(path / name) != entry["sha256"]:
            raise ValueError(f"{path / name}: sha256 does not match the manifest (damaged or replaced)")
    arrays = {name: map_safetensors(path / name, files[name].get("arrays", {})) for name in array_files}
    items = json.loads((path / ITEMS_JSON).read_text(encoding="utf-8"))
    bundle = Bundle(path, manifest, items["titles"], items["genres"], arrays)
    _check_consistency(bundle)
    return bundle


def map_safetensors(path, expected):
    """name -> read-only array mapped from a safetensors file, checked against `expected` (the manifest)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise ValueError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (header is not JSON)") from None
    header.pop("__metadata__", None)
    if set(header) != set(expected):
        raise ValueError(f"{path}: holds arrays {sorted(header)}, the manifest lists {sorted(expected)}")
    raw = np.memmap(path, np.uint8, mode="r") if size > 8 + header_len else np.zeros(0, np.uint8)
    arrays = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        shape = tuple(info.get("shape", ()))
        begin, end = info.get("data_offsets", (0, -1))
        if dtype is None or str(np.dtype(dtype)) != expected[name]["dtype"] or list(shape) != expected[name]["shape"]:
            raise ValueError(f"{path}: array {name} is {info.get('dtype')} {list(shape)}, "
                             f"the manifest says {expected[name]['dtype']} {expected[name]['shape']}")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if end - begin != nbytes or begin < 0 or 8 + header_len + end > size:
            raise ValueError(f"{path}: array {name} has bad data offsets {begin}..{end}")
        start = 8 + header_len + begin
        view = raw[start:start + nbytes].view(dtype).reshape(shape) if nbytes else np.zeros(shape, dtype)
        arrays[name] = np.require(view, requirements="A").view(np.ndarray)
    return arrays


def _check_consistency(bundle):
    cat = bundle.arrays["catalogue.safetensors"]
    inter = bundle.arrays["interactions.safetensors"]
    n = len(cat["item_ids"])
    problems = []
    if len(bundle.titles) != n:
        problems.append((ITEMS_JSON, f"{len(bundle.titles)} titles for {n} items"))
    if len(cat["genre_indptr"]) != n + 1 or cat["genre_indptr"][-1] != len(cat["genre_codes"]):
        problems.append(("catalogue.safetensors", "genre_indptr does not match genre_codes"))
    if len(cat["genre_codes"]) and (cat["genre_codes"].min() < 0 or cat["genre_codes"].max() >= len(bundle.genre_names)):
        problems.append(("catalogue.safetensors", "genre code outside the vocabulary"))
    indptr = inter["indptr"]
    if (len(indptr) != len(inter["user_ids"]) + 1 or indptr[0] != 0 or indptr[-1] != len(inter["items"])
            or np.any(np.diff(indptr) < 0)):
        problems.append(("interactions.safetensors", "indptr is not a CSR over the events"))
    if len(inter["items"]) and (inter["items"].min() < 0 or inter["items"].max() >= n):
        problems.append(("interactions.safetensors", "an event names an item row outside the catalogue"))
    if bundle.arrays["puresvd.safetensors"]["item_vectors"].shape[0] != n:
        problems.append(("puresvd.safetensors", "item_vectors rows differ from the item count"))
    content = bundle.arrays.get(CONTENT_FILE)
    if content is not None and (content["item_vectors"].ndim != 2 or content["item_vectors"].shape[0] != n):
        problems.append((CONTENT_FILE, "item_vectors rows differ from the item count"))
    ease = bundle.arrays["ease.safetensors"]
    if ease["weights"].shape != (len(ease["columns"]),) * 2 or (len(ease["columns"]) and ease["columns"].max() >= n):
        problems.append(("ease.safetensors", "weights and columns disagree with each other or the catalogue"))
    if problems:
        name, what = problems[0]
        raise ValueError(f"{bundle.path / name}: {what}")
