"""Texts the encoder is checked and timed on: MovieLens item texts (title, genres, tags) and a mixed
corpus of sentences, very short and very long texts and unicode (tests and bench/compare_encoder.py)."""
import csv
from pathlib import Path

import numpy as np

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"

SHORT_TEXTS = ["", " ", "a", "?", "ok", "Pixar", "sci-fi", "\t\n", "Toy Story", "a funny movie about toys",
               "dark thriller with a twist", "films like Alien but funnier", "romantic comedy in Paris"]
UNICODE_TEXTS = ["Amélie (Le fabuleux destin d'Amélie Poulain) (2001)", "Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)",
                 "千と千尋の神隠し", "Спирит: Душа прерий", "El laberinto del fauno", "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
                 "e\u0301te\u0301 (combining accents)", "zero\u200bwidth\u200bspaces", "emoji 🎬🍿 night", "مرحبا بالعالم",
                 "Ærøskøbing Straße Œuvre", "\u00a0non-breaking\u00a0spaces\u00a0", "control\x00chars\x07here"]
TEMPLATES = ["I want a {genre} movie about {tag}.", "Something like {title}, but more {tag}.",
             "{title} is a {genre} film that people call {tag}.", "Looking for {tag} {genre} for a rainy evening",
             "My kids loved {title}; what else is {genre} and {tag}?"]


def movielens_item_texts(path=MOVIELENS):
    """One text per movie in movies.csv order: "Title (year). Genre, Genre. Tags: tag, tag" (tags from
    tags.csv, first use order, without repeats; no "Tags:" part for untagged movies)."""
    path = Path(path)
    tags = {}
    with open(path / "tags.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            movie_tags = tags.setdefault(row["movieId"], [])
            if row["tag"] not in movie_tags:
                movie_tags.append(row["tag"])
    texts = []
    with open(path / "movies.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = f"{row['title']}. {row['genres'].replace('|', ', ')}"
            if row["movieId"] in tags:
                text += ". Tags: " + ", ".join(tags[row["movieId"]])
            texts.append(text)
    return texts


def mixed_texts(n, path=MOVIELENS, seed=0):
    """n texts (n >= 100): item texts, titles, genre lists, tags, template sentences, long texts (several
    item texts joined: past the 256-token limit), and every SHORT_TEXTS and UNICODE_TEXTS entry."""
    rng = np.random.default_rng(seed)
    items = movielens_item_texts(path)
    titles = [t.split(". ")[0] for t in items]
    genres = [t.split(". ")[1] if ". " in t else t for t in items]
    tags = sorted({tag for t in items if ". Tags: " in t for tag in t.split(". Tags: ")[1].split(", ")})
    texts = SHORT_TEXTS + UNICODE_TEXTS
    kinds = ("item", "title", "genres", "tag", "sentence", "long")
    while len(texts) < n:
        kind = kinds[len(texts) % len(kinds)]
        if kind == "item":
            texts.append(items[rng.integers(len(items))])
        elif kind == "title":
            texts.append(titles[rng.integers(len(titles))])
        elif kind == "genres":
            texts.append(genres[rng.integers(len(genres))])
        elif kind == "tag":
            texts.append(tags[rng.integers(len(tags))])
        elif kind == "sentence":
            texts.append(TEMPLATES[rng.integers(len(TEMPLATES))].format(
                genre=genres[rng.integers(len(genres))].split(", ")[0].lower(), tag=tags[rng.integers(len(tags))],
                title=titles[rng.integers(len(titles))]))
        else:
            texts.append(" ".join(items[i] for i in rng.integers(len(items), size=int(rng.integers(2, 40)))))
    return texts[:n]
