"""The text encoder (recscore.models.minilm, int8) against sentence-transformers fp32 (torch) and
ONNX Runtime int8 (torch.onnx.export + quantize_dynamic QInt8), same model, same threads (issue 17).

    python -m bench.compare encoder        # speed, by the protocol: bench/results/encoder-<level>.json
    python -m bench.compare_encoder        # accuracy on 2,000+ texts and the whole catalogue:
                                           #   bench/results/accuracy/encoder-<level>.json

Speed cases (texts from bench/encoder_texts.py):
  batch 64:   a call encodes 64 MovieLens item texts (title, genres, tags) drawn at random, batch_size=64;
              targets 2x sentence-transformers and 1x ONNX Runtime int8;
  one text:   a call encodes one short text (<= 16 tokens); target 3x sentence-transformers (and a
              median <= 2 ms, read from the ours column);
  catalogue:  a call encodes all 9,742 item texts (target: well under 10 s, the ours column).
"""
import json
import statistics
import time

import numpy as np

from bench.encoder_peers import OnnxEncoder, sentence_transformer
from bench.encoder_texts import SHORT_TEXTS, mixed_texts, movielens_item_texts
from bench.protocol import BENCH_DIR, THREADS, Comparison, machine_info, set_threads

N_SETS = 8
BATCH = 64
ACCURACY_TEXTS = 2400
NEIGHBOURS = 10


def onnx_peer():
    """(peer name, its target at batch 64). ONNX Runtime (MLAS) picks its kernels from cpuid and has no
    switch to cap them, so under RECSCORE_CPU below this CPU's level it still runs its best kernels: the
    name says so, and the 1.0x target, a comparison at one level, is left out there."""
    from recscore.kernels import cpu_info
    info = cpu_info()
    if info["level"] == info["detected"]:
        return "ONNX Runtime int8", 1.0
    return f"ONNX Runtime int8 (not capped: {info['detected']})", None


def comparisons(quick):
    from recscore.models.minilm import Encoder
    items = movielens_item_texts()
    rng = np.random.default_rng(17)
    batches = [[items[i] for i in rng.integers(len(items), size=BATCH)] for _ in range(N_SETS)]
    ours, ours_int4 = Encoder(), Encoder(dtype="int4")
    reference, onnx = sentence_transformer(), OnnxEncoder(THREADS)
    short = [t for t in SHORT_TEXTS if 3 <= len(ours.tokenize(t)[0]) <= 16][:N_SETS]
    assert len(short) == N_SETS, short

    def torch_encode(texts):
        return reference.encode(texts, batch_size=BATCH, convert_to_numpy=True)

    onnx_name, onnx_target = onnx_peer()
    name = f"batch {BATCH} MovieLens item texts"
    yield Comparison(name, "recscore int8", "sentence-transformers fp32", lambda i: ours.encode(batches[i]),
                     lambda i: torch_encode(batches[i]), n_sets=N_SETS, pairs=8 if quick else 24, target=2.0)
    yield Comparison(name, "recscore int8", onnx_name, lambda i: ours.encode(batches[i]),
                     lambda i: onnx.encode(batches[i]), n_sets=N_SETS, pairs=8 if quick else 24, target=onnx_target)
    yield Comparison(name, "recscore int4", onnx_name, lambda i: ours_int4.encode(batches[i]),
                     lambda i: onnx.encode(batches[i]), n_sets=N_SETS, pairs=8 if quick else 24)
    name = "one short text (<= 16 tokens)"
    yield Comparison(name, "recscore int8", "sentence-transformers fp32", lambda i: ours.encode(short[i]),
                     lambda i: torch_encode([short[i]]), n_sets=N_SETS, pairs=16 if quick else 64, target=3.0)
    yield Comparison(name, "recscore int8", onnx_name, lambda i: ours.encode(short[i]),
                     lambda i: onnx.encode([short[i]]), n_sets=N_SETS, pairs=16 if quick else 64)
    if not quick:
        yield Comparison(f"all {len(items):,} MovieLens item texts", "recscore int8", onnx_name,
                         lambda i: ours.encode(items), lambda i: onnx.encode(items), n_sets=1, pairs=3,
                         note="target: ours well under 10 s")


def cosine_summary(ours, theirs):
    cos = (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    return {"mean": float(cos.mean()), "min": float(cos.min()), "p01": float(np.quantile(cos, 0.01))}


def neighbours(vectors):
    """Each row's NEIGHBOURS nearest other rows by inner product (recscore topk, itself excluded)."""
    from recscore.kernels import topk
    n = len(vectors)
    _, ids = topk(vectors, vectors, NEIGHBOURS, exclude=(np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)))
    return ids


def overlap(a, b):
    return float(np.mean([len(set(x) & set(y)) / NEIGHBOURS for x, y in zip(a, b)]))


def accuracy():
    """Cosines to sentence-transformers fp32 on ACCURACY_TEXTS mixed texts, identical token ids, top-10
    neighbour overlap on every MovieLens item text, and the catalogue's encoding time."""
    from recscore.models.minilm import Encoder
    set_threads()
    reference, onnx = sentence_transformer(), OnnxEncoder(THREADS)
    encoders = {dtype: Encoder(dtype=dtype) for dtype in ("int8", "int4", "fp32")}
    texts = mixed_texts(ACCURACY_TEXTS)
    theirs_ids = reference.tokenizer(texts, truncation=True, max_length=reference.max_seq_length)["input_ids"]
    ours_ids = encoders["int8"].tokenize(texts)
    report = {"texts": len(texts), "tokens_identical": sum(list(a) == b for a, b in zip(ours_ids, theirs_ids)),
              "cosine_to_sentence_transformers": {}, "item_neighbour_overlap": {}, "catalogue_seconds": {}}
    expected = reference.encode(texts, batch_size=BATCH, convert_to_numpy=True)
    for dtype, encoder in encoders.items():
        report["cosine_to_sentence_transformers"][f"recscore {dtype}"] = cosine_summary(encoder.encode(texts), expected)
    report["cosine_to_sentence_transformers"]["ONNX Runtime int8"] = cosine_summary(onnx.encode(texts), expected)

    items = movielens_item_texts()
    start = time.perf_counter()
    item_vectors = reference.encode(items, batch_size=BATCH, convert_to_numpy=True)
    report["catalogue_seconds"]["sentence-transformers fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    onnx_vectors = onnx.encode(items)
    report["catalogue_seconds"]["ONNX Runtime int8"] = time.perf_counter() - start
    truth = neighbours(item_vectors)
    report["item_neighbour_overlap"]["ONNX Runtime int8"] = overlap(neighbours(onnx_vectors), truth)
    for dtype in ("int8", "int4"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            vectors = encoders[dtype].encode(items)
            times.append(time.perf_counter() - start)
        report["catalogue_seconds"][f"recscore {dtype}"] = statistics.median(times)
        report["item_neighbour_overlap"][f"recscore {dtype}"] = overlap(neighbours(vectors), truth)
    return report


def main():
    info = machine_info()
    report = {"machine": info, **accuracy()}
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    folder = BENCH_DIR / "results" / "accuracy"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"encoder-{info['cpu_level']}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
