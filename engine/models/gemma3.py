"""Gemma 3 (llama.cpp's `gemma3` architecture) from a GGUF file, on recscore's quantized kernels.

One flat file in the manner of gpt-fast: a config read from the GGUF metadata, the weights kept in
their GGUF blocks (QuantizedMatrix views of the memory-mapped file; only the norm vectors are float),
an explicit preallocated KV cache, and plain functions for the forward pass. The graph is llama.cpp's
(src/models/gemma3.cpp): embedding (Q8_0, tied to the output projection) times sqrt(dim); per layer
RMSNorm -> Q/K/V -> per-head RMSNorm of Q and K -> NEOX RoPE -> attention (1/sqrt(head_dim), keys of
every sixth layer global, the others a sliding window) -> output -> post-norm -> residual, then
RMSNorm -> GeGLU (tanh GELU) -> post-norm -> residual; final RMSNorm and logits. GGUF stores Gemma's
norm weights with the +1 already added (llama.cpp's converter does it), so RMSNorm multiplies by w.
Every matmul runs through `qmatmul`, the embedding lookup through `QuantizedMatrix.take`.
"""
import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from ..kernels import QuantizedMatrix, qmatmul
from ..kernels._cpu import kernel_threads
from .gguf_file import metadata, open_gguf

ARCHITECTURE = "gemma3"
SWA_PATTERN = 6                 # llama.cpp's gemma3 default: layers 5, 11, 17, ... attend to every position
LOCAL_ROPE_BASE = 10000.0       # llama.cpp's gemma3 default RoPE base of the sliding-window layers
PREFILL_CHUNK = 512             # tokens per forward step (bounds the attention score matrix)
SPLIT_ATTENTION_ROWS = 32       # continuations' attention runs on kernel_threads() threads from this many tokens
SPLIT_ROWS = 32                 # the per-token steps split into chunks of at least this many tokens, one a thread
GELU_TANH_C = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class Gemma3Config:
    n_layer: int
    dim: int
    n_head: int
    n_kv_head: int
    head_dim: int
    value_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    sliding_window: int
    local_layers: tuple        # per layer: True for a sliding-window layer
    rope_base_global: float
    rope_base_local: float
    rope_scale_global: float   # positions of global layers are divided by this (linear RoPE scaling)
    final_logit_softcap: float  # 0: none

    @classmethod
    def from_metadata(cls, meta, vocab_size, source="GGUF file"):
        arch = meta.get("general.architecture")
        if arch != ARCHITECTURE:
            raise ValueError(f"{source}: architecture is {arch!r}; this model runs {ARCHITECTURE!r} only")

        def key(name, default=None):
            value = meta.get(f"{ARCHITECTURE}.{name}", default)
            if value is None:
                raise ValueError(f"{source}: metadata has no {ARCHITECTURE}.{name}")
            return value

        n_layer = int(key("block_count"))
        pattern = meta.get(f"{ARCHITECTURE}.attention.sliding_window_pattern", SWA_PATTERN)
        if isinstance(pattern, np.ndarray):
            if pattern.shape != (n_layer,):
                raise ValueError(f"{source}: sliding_window_pattern has {pattern.size} entries for {n_layer} layers")
            local = tuple(bool(flag) for flag in pattern)
        else:   # llama.cpp's set_swa_pattern(n): layer il is local when il % n < n - 1 (n = 0: all)
            pattern = int(pattern)
            local = tuple(pattern == 0 or il % pattern < pattern - 1 for il in range(n_layer))
        scaling = meta.get(f"{ARCHITECTURE}.rope.scaling.type", "none")
        if scaling not in ("none", "linear"):
            raise ValueError(f"{source}: RoPE scaling {scaling!r} is not supported (none or linear)")
        head_dim = int(key("attention.key_length"))
        n_head, n_kv_head = int(key("attention.head_count")), int(key("attention.head_count_kv"))
        if n_head % n_kv_head:
            raise ValueError(f"{source}: {n_head} query heads are not a multiple of {n_kv_head} KV heads")
        return cls(
            n_layer=n_layer, dim=int(key("embedding_length")), n_head=n_head, n_kv_head=n_kv_head,
            head_dim=head_dim, value_dim=int(key("attention.value_length", head_dim)),
            ffn_dim=int(key("feed_forward_length")), vocab_size=int(vocab_size),
            context_length=int(key("context_length")), norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            sliding_window=int(key("attention.sliding_window")), local_layers=local,
            rope_base_global=float(key("rope.freq_base")),
            rope_base_local=float(key("rope.freq_base_swa", LOCAL_ROPE_BASE)),
            rope_scale_global=float(key("rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0,
            final_logit_softcap=float(key("final_logit_softcapping", 0.0)))


@dataclass
class Layer:
    attn_norm: np.ndarray
    q: QuantizedMatrix
    k: QuantizedMatrix
    v: QuantizedMatrix
    q_norm: np.ndarray
    k_norm: np.ndarray
    out: QuantizedMatrix
    post_attn_norm: np.ndarray
    ffn_norm: np.ndarray
    gate: QuantizedMatrix
    up: QuantizedMatrix
    down: QuantizedMatrix
    post_ffn_norm: np.ndarray


@dataclass
class Gemma3:
    """A loaded model: config, weights (views of the mapped file) and the reader that keeps the mapping open."""
    config: Gemma3Config
    token_embd: QuantizedMatrix
    output: QuantizedMatrix       # the output projection: token_embd itself when tied
    output_norm: np.ndarray
    layers: list
    metadata: dict
    path: str
    reader: object

    @property
    def nbytes(self):
        """Bytes of weights held (mapped file bytes, counted once)."""
        matrices = {id(m): m.nbytes for layer in self.layers for m in (layer.q, layer.k, layer.v, layer.out,
                                                                       layer.gate, layer.up, layer.down)}
        matrices[id(self.token_embd)] = self.token_embd.nbytes
        matrices[id(self.output)] = self.output.nbytes
        return sum(matrices.values())


def load_gguf(path):
    """A Gemma3 from a GGUF file, memory-mapped: weights stay in their GGUF block formats.

    ValueError naming the file (and tensor) for another architecture, missing or misshapen tensors,
    unsupported tensor types, or a damaged / truncated file.
    """
    path = str(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens")
    embd_rows = int(np.prod(tensors["token_embd.weight"].shape[1:])) if "token_embd.weight" in tensors else 0
    config = Gemma3Config.from_metadata(meta, len(tokens) if tokens is not None else embd_rows, path)
    c = config
    q_dim, kv_dim, v_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.value_dim

    def matrix(name, shape):
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        try:
            qm = QuantizedMatrix.from_gguf(tensors[name])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        if qm.shape != shape:
            raise ValueError(f"{path}: tensor {name!r} is {qm.shape[0]} x {qm.shape[1]} (out x in), expected "
                             f"{shape[0]} x {shape[1]}")
        return qm

    def vector(name, size):
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        tensor = tensors[name]
        if tensor.tensor_type.name != "F32" or tensor.n_elements != size:
            raise ValueError(f"{path}: tensor {name!r} is {tensor.tensor_type.name} with {tensor.n_elements} "
                             f"values, expected F32 with {size}")
        values = np.array(tensor.data, dtype=np.float32).reshape(size)
        if not np.isfinite(values).all():
            raise ValueError(f"{path}: tensor {name!r} holds NaN or inf (damaged file?)")
        return values

    token_embd = matrix("token_embd.weight", (c.vocab_size, c.dim))
    output = matrix("output.weight", (c.vocab_size, c.dim)) if "output.weight" in tensors else token_embd
    layers = []
    for il in range(c.n_layer):
        p = f"blk.{il}."
        layers.append(Layer(
            attn_norm=vector(p + "attn_norm.weight", c.dim),
            q=matrix(p + "attn_q.weight", (q_dim, c.dim)),
            k=matrix(p + "attn_k.weight", (kv_dim, c.dim)),
            v=matrix(p + "attn_v.weight", (v_dim, c.dim)),
            q_norm=vector(p + "attn_q_norm.weight", c.head_dim),
            k_norm=vector(p + "attn_k_norm.weight", c.head_dim),
            out=matrix(p + "attn_output.weight", (c.dim, c.n_head * c.value_dim)),
            post_attn_norm=vector(p + "post_attention_norm.weight", c.dim),
            ffn_norm=vector(p + "ffn_norm.weight", c.dim),
            gate=matrix(p + "ffn_gate.weight", (c.ffn_dim, c.dim)),
            up=matrix(p + "ffn_up.weight", (c.ffn_dim, c.dim)),
            down=matrix(p + "ffn_down.weight", (c.dim, c.ffn_dim)),
            post_ffn_norm=vector(p + "post_ffw_norm.weight", c.dim)))
    return Gemma3(config, token_embd, output, vector("output_norm.weight", c.dim), layers, meta, path, reader)


class KVCache:
    """Keys and values of one sequence, preallocated float32 (slots, kv_heads * head_dim) per layer.

    Global layers hold `capacity` positions (position p in slot p); sliding-window layers a ring of
    `sliding_window` slots (position p in slot p % window). `length` positions are filled; `tokens`
    are the tokens they came from (for prefix reuse).
    """

    def __init__(self, config, capacity):
        if not 1 <= capacity <= config.context_length:
            raise ValueError(f"capacity must be in [1, {config.context_length}] (the model's context), got {capacity}")
        self.config = config
        self.capacity = int(capacity)
        kv_dim, v_dim = config.n_kv_head * config.head_dim, config.n_kv_head * config.value_dim
        slots = [min(config.sliding_window, capacity) if local else capacity for local in config.local_layers]
        self.keys = [np.zeros((n, kv_dim), dtype=np.float32) for n in slots]
        self.values = [np.zeros((n, v_dim), dtype=np.float32) for n in slots]
        self.length = 0
        self.tokens = []

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    def truncatable_to(self, length, held=None):
        """Whether a state of `held` positions (default: this one's) can be cut back to its first
        `length` (0: always): a ring keeps only the last `window` positions, so cutting deeper than one
        position needs it never to have wrapped."""
        held = self.length if held is None else held
        has_ring = any(self.config.local_layers) and self.config.sliding_window < self.capacity
        return 0 <= length <= held and (length == 0 or not has_ring or held <= self.config.sliding_window
                                        or length >= held - 1)

    def truncate(self, length):
        if not self.truncatable_to(length):
            raise ValueError(f"cannot cut a KV cache of {self.length} positions back to {length}")
        self.length = length
        del self.tokens[length:]


# ---- the forward pass -------------------------------------------------------------------------------

def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Gemma's +1 is in the GGUF weight)."""
    root = np.einsum("...i,...i->...", x, x)[..., None]
    root *= np.float32(1.0 / x.shape[-1])
    root += np.float32(eps)
    np.sqrt(root, out=root)
    out = x / root       # one temporary, scaled in place (NumPy runs these passes on one core)
    out *= weight
    return out


def gelu_tanh(x, times=None):
    """0.5 x (1 + tanh(c (x + 0.044715 x^3))), multiplied by `times` if given, in one temporary."""
    out = x * x
    out *= np.float32(0.044715 * GELU_TANH_C)
    out += np.float32(GELU_TANH_C)
    out *= x
    np.tanh(out, out=out)
    out += np.float32(1.0)
    out *= x
    if times is not None:
        out *= times
    out *= np.float32(0.5)
    return out


def rope_tables(positions, head_dim, base, scale):
    """cos, sin (T, head_dim / 2) of NEOX RoPE at `positions` (divided by `scale`)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    angles = (positions.astype(np.float64) / scale)[:, None] * base ** -exponents[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x, cos, sin):
    """NEOX rotation of x (T, heads, head_dim): pairs (i, i + head_dim / 2)."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([first * c - second * s, second * c + first * s], axis=-1)


@dataclass
class _Plan:
    """How one kind of layer (global or sliding-window) attends in one causal forward step."""
    cached: int               # cache slots [0, cached) are read as keys (before the new ones, unless write_first)
    write_slots: np.ndarray   # slots the last len(write_slots) new tokens' keys go to
    write_first: bool         # write the new keys, then attend over slots [0, cached) in place
    bias: np.ndarray          # additive mask (T, keys), or None when every key is visible


@dataclass
class _BranchPlan:
    """How one kind of layer attends when independent continuations share the cached prefix.

    The continuations are laid out padded, (n, L) tokens: each sees the prefix (pre_bias) and the
    earlier tokens of its own continuation (own_bias, causal); padding rows see their own position
    only, and their outputs are dropped.
    """
    cached: int
    pad_index: np.ndarray     # (n, L): token row of each padded slot (0 for padding)
    rows: np.ndarray          # flat padded slots of the real tokens, in token order
    pre_bias: np.ndarray      # (L, cached) or None
    own_bias: np.ndarray      # (L, L)


def _mask(hidden):
    return np.where(hidden, np.float32(-np.inf), np.float32(0.0))


def _layout(cache, window):
    """(ring slots, is it a ring) of a layer kind: a sliding window shorter than the cache is a ring."""
    ring = bool(window) and window < cache.capacity
    return (window if ring else cache.capacity), ring


def _slot_positions(length, slots, window):
    """The positions held by slots [0, slots) once positions [0, length) are written (ring of `window`)."""
    s = np.arange(slots)
    return s + window * ((length - 1 - s) // window) if window else s


def _plan(cache, window, count):
    """The attention plan for `count` new tokens after the cache's `cache.length` positions."""
    start = cache.length
    slots, ring = _layout(cache, window)
    positions = start + np.arange(count)
    if not ring or count == 1 or start + count <= window:
        # the new keys overwrite nothing still needed: write them, attend over the cache in place
        held = min(start + count, slots)
        bias = None
        if count > 1:   # causal: a window this short is never exceeded inside it
            kpos = _slot_positions(start + count, held, window if ring else 0)
            bias = _mask(kpos[None, :] > positions[:, None])
        return _Plan(held, positions % slots, True, bias)
    held = min(start, slots)
    kpos = np.concatenate([_slot_positions(start, held, window), positions])
    hidden = (kpos[None, :] > positions[:, None]) | (positions[:, None] - kpos[None, :] >= window)
    keep = min(count, slots)
    return _Plan(held, positions[count - keep:] % slots, False, _mask(hidden))


def _branch_plan(cache, window, lengths):
    start = cache.length
    slots, ring = _layout(cache, window)
    held = min(start, slots)
    kpos = _slot_positions(start, held, window if ring else 0)
    n, width = len(lengths), int(lengths.max())
    column = np.arange(width)
    real = column[None, :] < lengths[:, None]
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pad_index = np.where(real, first[:, None] + column[None, :], 0)
    own_hidden = column[None, :] > column[:, None]
    pre_bias = None
    if window:
        own_hidden |= column[:, None] - column[None, :] >= window
        pre_hidden = (start + column)[:, None] - kpos[None, :] >= window
        pre_bias = _mask(pre_hidden) if pre_hidden.any() else None
    return _BranchPlan(held, pad_index, np.flatnonzero(real.ravel()), pre_bias, _mask(own_hidden))


def _softmax_rows(scores):
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def _attend(q, k, v, keys, values, plan):
    """softmax(q K^T + bias) V for q (T, heads, head_dim), already scaled; k, v the new (T, kv_dim)."""
    T, n_head, head_dim = q.shape
    if plan.write_first:
        keys[plan.write_slots] = k
        values[plan.write_slots] = v
        K, V = keys[:plan.cached], values[:plan.cached]
    else:
        K = np.concatenate([keys[:plan.cached], k])
        V = np.concatenate([values[:plan.cached], v])
        kept = len(plan.write_slots)
        keys[plan.write_slots] = k[T - kept:]
        values[plan.write_slots] = v[T - kept:]
    n_kv = K.shape[1] // head_dim
    group, value_dim = n_head // n_kv, V.shape[1] // n_kv
    out = np.empty((T, n_head, value_dim), dtype=np.float32)
    for g in range(n_kv):
        heads = slice(g * group, (g + 1) * group)
        # K @ q^T: BLAS runs the (few rows) x (many keys) product far faster this way round
        scores = np.matmul(K[:, g * head_dim:(g + 1) * head_dim], q[:, heads].reshape(T * group, head_dim).T).T
        if plan.bias is not None:
            scores = (scores.reshape(T, group, -1) + plan.bias[:, None, :]).reshape(T * group, -1)
        probabilities = _softmax_rows(np.ascontiguousarray(scores))
        out[:, heads] = np.matmul(probabilities, V[:, g * value_dim:(g + 1) * value_dim]).reshape(T, group, value_dim)
    return out.reshape(T, n_head * value_dim)


def _attend_branches(q, k, v, keys, values, plan):
    """Attention of independent continuations (see _BranchPlan); nothing is written to the cache."""
    n_head, head_dim = q.shape[1:]
    n, width = plan.pad_index.shape
    K, V = keys[:plan.cached], values[:plan.cached]
    q_pad, k_pad, v_pad = q[plan.pad_index], k[plan.pad_index], v[plan.pad_index]
    n_kv = K.shape[1] // head_dim
    group, value_dim = n_head // n_kv, V.shape[1] // n_kv
    out = np.empty((n, width, n_head, value_dim), dtype=np.float32)
    for g in range(n_kv):
        heads, kd, vd = (slice(g * group, (g + 1) * group), slice(g * head_dim, (g + 1) * head_dim),
                         slice(g * value_dim, (g + 1) * value_dim))
        queries = np.ascontiguousarray(q_pad[:, :, heads]).reshape(n, width * group, head_dim)
        prefix = np.matmul(queries.reshape(-1, head_dim), K[:, kd].T).reshape(n, width, group, plan.cached)
        if plan.pre_bias is not None:
            prefix += plan.pre_bias[None, :, None, :]
        own = np.matmul(queries, k_pad[:, :, kd].transpose(0, 2, 1)).reshape(n, width, group, width)
        own += plan.own_bias[None, :, None, :]
        top = np.maximum(prefix.max(axis=-1, keepdims=True) if plan.cached else -np.inf, own.max(axis=-1, keepdims=True))
        prefix = np.exp(prefix - top)
        own = np.exp(own - top)
        total = prefix.sum(axis=-1, keepdims=True) + own.sum(axis=-1, keepdims=True)
        mixed = (np.matmul(prefix.reshape(-1, plan.cached), V[:, vd]).reshape(n, width, group, value_dim)
                 + np.matmul(own.reshape(n, width * group, width), v_pad[:, :, vd]).reshape(n, width, group, value_dim))
        out[:, :, heads] = mixed / total
    return out.reshape(n * width, n_head * value_dim)[plan.rows]


_blas_lock = threading.Lock()
_blas_state = {"users": 0, "saved": None, "controllers": None}


@contextlib.contextmanager
def blas_on_calling_thread():
    """NumPy's BLAS (attention) limited to the calling thread while this is open, in every thread that
    opens it (counted; the first one in saves the setting, the last one out restores it).

    Why: after each call OpenBLAS's idle workers spin for a while (2^28 cycles by default) and take
    the cores from qmatmul's OpenMP threads: on 2 cores the layers' qmatmul calls ran 1.8x slower
    between attention calls (bench/notes/llm.md).
    """
    with _blas_lock:
        state = _blas_state
        if state["controllers"] is None:
            state["controllers"] = ThreadpoolController().select(user_api="blas").lib_controllers
        if state["users"] == 0:
            state["saved"] = [lib.get_num_threads() for lib in state["controllers"]]
            for lib in state["controllers"]:
                lib.set_num_threads(1)
        state["users"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            state["users"] -= 1
            if state["users"] == 0:
                for lib, threads in zip(state["controllers"], state["saved"]):
                    lib.set_num_threads(threads)


def _run_layers(model, tokens, positions, attend):
    """The transformer over `tokens` at `positions`; attend(layer index, q, k, v) does the attention.
    Returns the final-normed hidden states (T, dim)."""
    with blas_on_calling_thread():
        return _layers(model, tokens, positions, attend)


def _layers(model, tokens, positions, attend):
    c = model.config
    T, eps = len(tokens), c.norm_eps
    ropes = {False: rope_tables(positions, c.head_dim, c.rope_base_global, c.rope_scale_global),
             True: rope_tables(positions, c.head_dim, c.rope_base_local, 1.0)}
    scale = np.float32(1.0 / math.sqrt(c.head_dim))
    x = model.token_embd.take(tokens) * np.float32(math.sqrt(c.dim))
    # the per-token NumPy steps between the matmuls run on row chunks, one per thread (NumPy uses one
    # core a call): each row's arithmetic is the same as in one piece
    parts = max(1, min(kernel_threads(), T // SPLIT_ROWS))
    edges = np.linspace(0, T, parts + 1).astype(int)
    chunks = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]

    def rowwise(step):
        in_parallel([lambda rows=rows: step(rows) for rows in chunks])

    h = np.empty_like(x)
    rowwise(lambda r: h.__setitem__(r, rms_norm(x[r], model.layers[0].attn_norm, eps)))
    for il, layer in enumerate(model.layers):
        q_in = qmatmul(h, layer.q).reshape(T, c.n_head, c.head_dim)
        k_in = qmatmul(h, layer.k).reshape(T, c.n_kv_head, c.head_dim)
        v = qmatmul(h, layer.v)
        cos, sin = ropes[c.local_layers[il]]
        q, k = np.empty_like(q_in), np.empty((T, c.n_kv_head * c.head_dim), dtype=np.float32)

        def query_key(r):
            q[r] = apply_rope(rms_norm(q_in[r], layer.q_norm, eps), cos[r], sin[r]) * scale
            k[r] = apply_rope(rms_norm(k_in[r], layer.k_norm, eps), cos[r], sin[r]).reshape(-1, k.shape[1])
        rowwise(query_key)
        o = qmatmul(attend(il, q, k, v), layer.out)

        def post_attention(r):
            x[r] += rms_norm(o[r], layer.post_attn_norm, eps)
            h[r] = rms_norm(x[r], layer.ffn_norm, eps)
        rowwise(post_attention)
        gate, up = qmatmul(h, layer.gate), qmatmul(h, layer.up)
        rowwise(lambda r: gate.__setitem__(r, gelu_tanh(gate[r], up[r])))
        d = qmatmul(gate, layer.down)
        following = model.layers[il + 1].attn_norm if il + 1 < len(model.layers) else model.output_norm

        def post_ffn(r):
            x[r] += rms_norm(d[r], layer.post_ffn_norm, eps)
            h[r] = rms_norm(x[r], following, eps)
        rowwise(post_ffn)
    return h


def _windows(config):
    return [config.sliding_window if local else 0 for local in config.local_layers]


def forward(model, cache, tokens):
    """Run `tokens` (ints) as the continuation of the cache's sequence, storing their keys (the cache
    grows by len(tokens)); the final-normed hidden states (T, dim)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    if cache.length + T > cache.capacity:
        raise ValueError(f"the sequence needs {cache.length + T} positions; the KV cache holds {cache.capacity}")
    windows = _windows(model.config)
    plans = {window: _plan(cache, window, T) for window in set(windows)}
    hidden = _run_layers(model, tokens, cache.length + np.arange(T), lambda il, q, k, v: _attend(
        q, k, v, cache.keys[il], cache.values[il], plans[windows[il]]))
    cache.length += T
    cache.tokens.extend(tokens.tolist())
    return hidden


def forward_branches(model, cache, tokens, lengths):
    """Independent continuations of the cache's sequence in one pass: `tokens` is their concatenation,
    `lengths` their lengths; each token sees the cached prefix and the earlier tokens of its own
    continuation (a block mask). The cache is not changed. Final-normed hidden states (T, dim)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0 or lengths.min() < 1 or lengths.sum() != len(tokens):
        raise ValueError(f"lengths must be positive and sum to the {len(tokens)} tokens, got {lengths.tolist()}")
    if cache.length + lengths.max() > cache.capacity:
        raise ValueError(f"a continuation needs {cache.length + lengths.max()} positions; "
                         f"the KV cache holds {cache.capacity}")
    windows = _windows(model.config)
    # the continuations split into runs of whole continuations, one per thread, of about equal tokens:
    # attention is NumPy/BLAS on the calling thread (see blas_on_calling_thread), so a second core helps
    ends = np.cumsum(lengths)
    parts = min(kernel_threads(), len(lengths)) if len(tokens) >= SPLIT_ATTENTION_ROWS else 1
    cuts = np.unique(np.searchsorted(ends, len(tokens) * np.arange(1, parts) / parts, side="left") + 1)
    bounds = [0, *cuts[cuts < len(lengths)].tolist(), len(lengths)]
    runs = [(int(ends[a] - lengths[a]), int(ends[b - 1]),
             {window: _branch_plan(cache, window, lengths[a:b]) for window in set(windows)})
            for a, b in zip(bounds[:-1], bounds[1:])]

    def attend(il, q, k, v):
        def run(first, last, plans):
            return _attend_branches(q[first:last], k[first:last], v[first:last], cache.keys[il], cache.values[il],
                                    plans[windows[il]])
        outs = in_parallel([lambda run_=run_: run(*run_) for run_ in runs])
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    positions = cache.length + np.concatenate([np.arange(n) for n in lengths])
    return _run_layers(model, tokens, positions, attend)


_pool_lock = threading.Lock()
_pool = {"executor": None, "workers": 0}


def in_parallel(calls):
    """[call() for call in calls], the first on the calling thread and the others on helper threads
    (for NumPy work, which releases the GIL); exceptions are raised here."""
    if len(calls) == 1:
        return [calls[0]()]
    with _pool_lock:
        if _pool["workers"] < len(calls) - 1:
            if _pool["executor"] is not None:
                _pool["executor"].shutdown(wait=False)
            _pool["executor"] = ThreadPoolExecutor(len(calls) - 1, thread_name_prefix="recscore-gemma3")
            _pool["workers"] = len(calls) - 1
        executor = _pool["executor"]
    waiting = [executor.submit(call) for call in calls[1:]]
    try:
        first = calls[0]()
    finally:
        wait(waiting)   # no helper may still be working on the caller's arrays when it goes on
    return [first, *(future.result() for future in waiting)]


def output_slices(model, rows_per_slice):
    """The output projection as QuantizedMatrix views of rows_per_slice vocabulary rows each (no copy)."""
    out, vocab = model.output, model.output.shape[0]
    return [QuantizedMatrix(out.fmt, (min(rows_per_slice, vocab - first), out.shape[1]),
                            out.data[first:first + rows_per_slice],
                            None if out.scales is None else out.scales[first:first + rows_per_slice], out.group_size)
            for first in range(0, vocab, rows_per_slice)]


def logits(model, hidden, output=None):
    """Next-token logits (R, vocab) of final hidden states (R, dim): the output projection (or one of its
    output_slices, for that slice's columns), softcapped if the model says so."""
    out = qmatmul(np.ascontiguousarray(hidden, dtype=np.float32), model.output if output is None else output)
    cap = model.config.final_logit_softcap
    if cap:
        out = np.tanh(out / np.float32(cap)) * np.float32(cap)
    return out


def prefill(model, cache, tokens):
    """forward() in chunks of PREFILL_CHUNK tokens; the hidden state of the last token (1, dim)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if not len(tokens):
        raise ValueError("tokens is empty")
    for first in range(0, len(tokens), PREFILL_CHUNK):
        hidden = forward(model, cache, tokens[first:first + PREFILL_CHUNK])
    return hidden[-1:]
