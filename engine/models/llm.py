"""A quantized LLM you can generate with and score with: `LLM.from_gguf(path)`.

One working KV cache holds the last sequence run; a prompt that starts with it (or with one of the
sequences kept in a bytes-bounded LRU of cache snapshots) runs only its new tokens. Calls are
serialised by a lock (one sequence at a time).
"""
import codecs
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..kernels._cpu import kernel_threads
from . import gemma3
from .gguf_file import default_model_path
from .tokenizers import GGUFTokenizer

DEFAULT_CONTEXT = 4096              # KV cache positions (global layers; local layers keep their window)
DEFAULT_PREFIX_CACHE_BYTES = 64 << 20
# Scoring runs up to SCORE_ROWS rows against one slice of the vocabulary at a time (one read of the
# output projection per SCORE_ROWS rows; logits of 256 x 32768 float32: 32 MB); a slice is above
# qmatmul's stored-panel size (PANEL_MAX_WEIGHTS), so it is streamed, not repacked into 230 MB of
# panels (8192-row slices ran ~25% faster on 242 rows, but only from such panels: bench/notes/llm.md).
SCORE_ROWS = 256
VOCAB_SLICE = 32768
SPLIT_LSE_VALUES = 1 << 18      # logit blocks from this size have their log-sum-exp split across threads


@dataclass(frozen=True)
class CandidateScore:
    """log P(candidate | prefix): `total` (natural log), `mean` per token, over `n_tokens` tokens."""
    total: float
    mean: float
    n_tokens: int


@dataclass
class GenerationStats:
    """What the last generation cost: prompt tokens (and how many ran, the rest came from a cache),
    tokens generated, seconds to the first generated token and in all."""
    prompt_tokens: int
    prompt_tokens_run: int = 0
    generated_tokens: int = 0
    first_token_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def decode_tokens_per_second(self):
        """Generated tokens after the first, per second of their decoding."""
        decoding = self.seconds - self.first_token_seconds
        return (self.generated_tokens - 1) / decoding if self.generated_tokens > 1 and decoding > 0 else 0.0


@dataclass
class _Snapshot:
    tokens: tuple
    keys: list
    values: list
    hidden: np.ndarray    # the final hidden state of the last token (1, dim)

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values) + self.hidden.nbytes


class PrefixCache:
    """KV-cache snapshots of earlier prompts, least recently used dropped first beyond `max_bytes`."""

    def __init__(self, max_bytes):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._entries = OrderedDict()

    def __len__(self):
        return len(self._entries)

    def store(self, cache, hidden):
        """Keep a copy of `cache` and of the last token's hidden state (the cache's tokens are the key)."""
        key = tuple(cache.tokens)
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        held = [min(len(key), a.shape[0]) for a in cache.keys]
        snapshot = _Snapshot(key, [a[:n].copy() for a, n in zip(cache.keys, held)],
                             [a[:n].copy() for a, n in zip(cache.values, held)], hidden.copy())
        if snapshot.nbytes > self.max_bytes:
            return
        self._entries[key] = snapshot
        self.nbytes += snapshot.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def get(self, tokens):
        """The snapshot of exactly `tokens`, or None."""
        return self._entries.get(tuple(tokens))

    def find(self, cache, tokens, limit):
        """(snapshot, length): the snapshot sharing the longest prefix with `tokens` that `cache` can be
        cut back to, at most `limit` positions; (None, 0) when none shares any."""
        best, best_length = None, 0
        for snapshot in self._entries.values():
            length = min(_common_prefix(snapshot.tokens, tokens), limit)
            if length > best_length and cache.truncatable_to(length, held=len(snapshot.tokens)):
                best, best_length = snapshot, length
        return best, best_length

    def load(self, snapshot, cache, length):
        """Put `snapshot` into `cache`, cut back to `length` positions."""
        self._entries.move_to_end(snapshot.tokens)
        for target, source in zip(cache.keys + cache.values, snapshot.keys + snapshot.values):
            target[:len(source)] = source
        cache.length, cache.tokens = len(snapshot.tokens), list(snapshot.tokens)
        cache.truncate(length)


def _common_prefix(a, b):
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


class LLM:
    """Generation and scoring with a GGUF model on recscore's kernels (Gemma 3)."""

    def __init__(self, model, tokenizer, *, context=DEFAULT_CONTEXT, prefix_cache_bytes=DEFAULT_PREFIX_CACHE_BYTES):
        if tokenizer.vocab_size != model.config.vocab_size:
            raise ValueError(f"{model.path}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                             f"{model.config.vocab_size} embedding rows")
        self.model, self.tokenizer = model, tokenizer
        self.cache = gemma3.KVCache(model.config, min(int(context), model.config.context_length))
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._output_slices = gemma3.output_slices(model, VOCAB_SLICE)
        self.stats = None          # GenerationStats of the last generation
        self._tokens_run = 0       # prompt tokens the last _run_prompt computed
        self._lock = threading.RLock()

    @classmethod
    def from_gguf(cls, path=None, **options):
        """Load a GGUF file (default: the packaged Gemma 3 270M, see gguf_file.default_model_path)."""
        model = gemma3.load_gguf(default_model_path() if path is None else path)
        return cls(model, GGUFTokenizer.from_metadata(model.metadata, model.path), **options)

    # ---- text in, text out ------------------------------------------------------------------------

    def tokenize(self, text, *, add_bos=True):
        return self.tokenizer.encode(text, add_bos=add_bos)

    def generate(self, prompt, max_new_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=()):
        """The continuation of `prompt` (str, or token ids) as a str; see stream() for the options."""
        return "".join(self.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, stop=stop))

    def stream(self, prompt, max_new_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=()):
        """Yield the continuation of `prompt` as pieces of text, as they are generated.

        temperature 0 (or top_k 1): greedy. Otherwise top_k (0: off) and top_p (1: off) cut the
        candidates, on probabilities before temperature as llama.cpp's default chain does, and a token
        is drawn with NumPy's default_rng(seed). Generation ends after max_new_tokens, at an end token,
        at the first of the `stop` strings (not included in the text), or when the context is full.
        """
        stops = _stops(stop)
        token_ids = self._prompt_tokens(prompt)
        sampler = _sampler(temperature, top_k, top_p, seed)
        return self._stream(token_ids, _count("max_new_tokens", max_new_tokens), sampler, stops)

    def _stream(self, token_ids, max_new_tokens, sampler, stops):
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        held = ""   # text that may be the start of a stop string
        with self._lock:
            for token in self._generate_ids(token_ids, max_new_tokens, sampler):
                if token in self.tokenizer.end_ids:
                    break
                held += decoder.decode(self.tokenizer.token_bytes(token))
                text, held, stopped = _split_at_stop(held, stops)
                if text:
                    yield text
                if stopped:
                    return
        text, _, _ = _split_at_stop(held + decoder.decode(b"", final=True), stops, final=True)
        if text:
            yield text

    def generate_ids(self, prompt, max_new_tokens=64, *, temperature=0.0, top_k=0, top_p=1.0, seed=None):
        """The generated token ids (end token included if one was drawn)."""
        token_ids = self._prompt_tokens(prompt)
        sampler = _sampler(temperature, top_k, top_p, seed)
        with self._lock:
            return list(self._generate_ids(token_ids, _count("max_new_tokens", max_new_tokens), sampler))

    def _generate_ids(self, token_ids, max_new_tokens, sampler):
        stats = self.stats = GenerationStats(prompt_tokens=len(token_ids))
        if max_new_tokens == 0:
            return
        start = time.perf_counter()
        hidden = self._run_prompt(token_ids)
        stats.prompt_tokens_run = self._tokens_run
        for step in range(max_new_tokens):
            token = sampler(gemma3.logits(self.model, hidden)[0])
            stats.generated_tokens += 1
            if step == 0:
                stats.first_token_seconds = time.perf_counter() - start
            stats.seconds = time.perf_counter() - start
            yield token
            if token in self.tokenizer.end_ids or step == max_new_tokens - 1 or self.cache.length >= self.cache.capacity:
                return
            hidden = gemma3.forward(self.model, self.cache, [token])

    # ---- scoring ----------------------------------------------------------------------------------

    def score(self, prefix, candidates):
        """log P(candidate | prefix) for each candidate: a list of CandidateScore.

        prefix: str (tokenized with BOS) or token ids; candidates: strs (tokenized without BOS, on
        their own) or token-id lists. The prefix runs once (through the prefix cache); every candidate
        runs in one batched pass that attends to the shared prefix, and the output projection is
        computed only for the rows that predict a candidate token.
        """
        prefix_ids = self._prompt_tokens(prefix)
        candidate_ids = self._candidate_tokens(candidates)
        lengths = np.array([len(c) for c in candidate_ids], dtype=np.int64)
        # the last token of a candidate predicts nothing: the batched pass runs the others, and row 0
        # (the prefix's last state) predicts every first token
        inputs = lengths - 1
        first_input = np.cumsum(inputs) - inputs
        row_of = np.concatenate([np.concatenate([[0], 1 + first + np.arange(n)]) for first, n in zip(first_input, inputs)])
        with self._lock:
            rows = self._run_prompt(prefix_ids)
            if inputs.any():
                hidden = gemma3.forward_branches(self.model, self.cache, np.concatenate([c[:-1] for c in candidate_ids]),
                                                 inputs[inputs > 0])
                rows = np.concatenate([rows, hidden])
            logprobs = self._target_logprobs(rows, row_of, np.concatenate(candidate_ids))
        totals = np.add.reduceat(logprobs, np.cumsum(lengths) - lengths)
        return [CandidateScore(float(t), float(t / n), int(n)) for t, n in zip(totals, lengths)]

    def label_logprobs(self, prompt, label_token_ids):
        """log P(token | prompt) of each token id in `label_token_ids` (float64 array), from one pass."""
        token_ids = self._prompt_tokens(prompt)
        labels = np.asarray(label_token_ids)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise TypeError("label_token_ids must be a 1-D sequence of ints")
        bad = np.flatnonzero((labels < 0) | (labels >= self.tokenizer.vocab_size))
        if bad.size:
            raise IndexError(f"label_token_ids[{bad[0]}] = {labels[bad[0]]} is not a token id "
                             f"(vocabulary of {self.tokenizer.vocab_size})")
        with self._lock:
            row = gemma3.logits(self.model, self._run_prompt(token_ids))
        chosen = row[0, labels].astype(np.float64)
        return chosen - _logsumexp(row)[0]

    def _target_logprobs(self, rows, row_of, targets):
        """log softmax(logits(rows[row_of[i]]))[targets[i]] for every i: SCORE_ROWS rows at a time against
        one vocabulary slice at a time, the log-sum-exp kept running (max and sum of exp per row)."""
        out = np.empty(len(targets), dtype=np.float64)
        for start in range(0, len(rows), SCORE_ROWS):
            group = rows[start:start + SCORE_ROWS]
            mine = np.flatnonzero((row_of >= start) & (row_of < start + len(group)))
            local, wanted = row_of[mine] - start, targets[mine]
            chosen = np.empty(len(mine), dtype=np.float64)
            top, total, first = np.full(len(group), -np.inf), np.zeros(len(group)), 0
            for output in self._output_slices:
                block = gemma3.logits(self.model, group, output)
                inside = np.flatnonzero((wanted >= first) & (wanted < first + block.shape[1]))
                chosen[inside] = block[local[inside], wanted[inside] - first]
                self._fold_logsumexp(block, top, total)
                first += block.shape[1]
            out[mine] = chosen - (top + np.log(total))[local]
        return out

    @staticmethod
    def _fold_logsumexp(block, top, total):
        """_fold_rows over row chunks on kernel_threads() threads (NumPy's max/exp/sum release the GIL):
        the same per-row arithmetic, split because one core would leave the other idle."""
        parts = min(kernel_threads(), len(block)) if block.size >= SPLIT_LSE_VALUES else 1
        edges = np.linspace(0, len(block), parts + 1).astype(int)
        gemma3.in_parallel([lambda c=slice(a, b): _fold_rows(block[c], top[c], total[c])
                            for a, b in zip(edges[:-1], edges[1:])])

    # ---- the prompt and the caches ----------------------------------------------------------------

    def _prompt_tokens(self, prompt):
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = self._checked_ids("prompt", prompt)
        if not ids:
            raise ValueError("prompt has no tokens (pass add_bos text or at least one token id)")
        if len(ids) >= self.cache.capacity:
            raise ValueError(f"prompt has {len(ids)} tokens; the context holds {self.cache.capacity}")
        return ids

    def _candidate_tokens(self, candidates):
        if isinstance(candidates, str) or not len(candidates):
            raise TypeError("candidates must be a non-empty list of strs or of token-id lists")
        if all(isinstance(c, str) for c in candidates):
            ids = self.tokenizer.encode_batch(list(candidates), add_bos=False)
        else:
            ids = [self._checked_ids(f"candidates[{i}]", c) for i, c in enumerate(candidates)]
        for i, c in enumerate(ids):
            if not c:
                raise ValueError(f"candidates[{i}] has no tokens")
        return [np.asarray(c, dtype=np.int64) for c in ids]

    def _checked_ids(self, name, ids):
        if isinstance(ids, str):
            raise TypeError(f"{name} must be token ids here, got a str")
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise TypeError(f"{name} must be a 1-D sequence of token ids")
        bad = np.flatnonzero((array < 0) | (array >= self.tokenizer.vocab_size))
        if bad.size:
            raise IndexError(f"{name}[{bad[0]}] = {array[bad[0]]} is not a token id (vocabulary of "
                             f"{self.tokenizer.vocab_size})")
        return array.astype(np.int64).tolist()

    def _run_prompt(self, token_ids):
        """Make the working cache hold `token_ids`, running only what no cache holds; the final hidden
        state of the last token (1, dim). A prompt seen before reuses its snapshot whole (so a repeated
        call computes nothing anew and gives the same result); otherwise at least its last token runs."""
        same = self.prefix_cache.get(token_ids)
        if same is not None:
            if (_common_prefix(self.cache.tokens, token_ids) == len(token_ids)
                    and self.cache.truncatable_to(len(token_ids))):
                self.cache.truncate(len(token_ids))    # the working cache holds it already
            else:
                self.prefix_cache.load(same, self.cache, len(token_ids))
            self._tokens_run = 0
            return same.hidden
        limit = len(token_ids) - 1
        reused = min(_common_prefix(self.cache.tokens, token_ids), limit)
        if not self.cache.truncatable_to(reused):
            reused = 0
        snapshot, restored = self.prefix_cache.find(self.cache, token_ids, limit)
        if restored > reused:
            self.prefix_cache.load(snapshot, self.cache, restored)
        else:
            self.cache.truncate(reused)
        self._tokens_run = len(token_ids) - self.cache.length
        hidden = gemma3.prefill(self.model, self.cache, token_ids[self.cache.length:])
        self.prefix_cache.store(self.cache, hidden)
        return hidden


def _fold_rows(block, top, total):
    """Fold a logits block (rows, slice) into each row's running max `top` and sum of exp(logit - top)
    `total` (float64, in place); `block` is overwritten. One slice is summed in float32 (pairwise:
    relative error ~1e-6 over 32768 terms in (0, 1]), the slices in float64."""
    block_top = np.maximum(top, block.max(axis=1))
    block -= block_top[:, None].astype(np.float32)
    np.exp(block, out=block)
    total *= np.exp(top - block_top)
    total += block.sum(axis=1)
    top[:] = block_top


def _logsumexp(rows):
    """log(sum(exp(row))) of each row (float64), computed in place in `rows` (float32: no copy of a
    vocabulary-wide block)."""
    top = rows.max(axis=-1, keepdims=True)
    rows -= top
    np.exp(rows, out=rows)
    return top[:, 0].astype(np.float64) + np.log(rows.sum(axis=-1, dtype=np.float64))


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def _stops(stop):
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise TypeError("stop must be a non-empty str or a sequence of non-empty strs")
    return stops


def _split_at_stop(text, stops, final=False):
    """(text to emit, text held back, stopped): cut at the first stop string; hold back a tail that
    could still grow into one (unless final)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return text[:min(hits)], "", True
    if final:
        return text, "", False
    hold = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)
    return text[:len(text) - hold], text[len(text) - hold:], False


def _sampler(temperature, top_k, top_p, seed):
    """A function logits (vocab,) -> token id."""
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    _count("top_k", top_k)
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if temperature == 0 or top_k == 1:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def sample(logits):
        ids = np.argpartition(logits, -top_k)[-top_k:] if 0 < top_k < len(logits) else np.arange(len(logits))
        values = logits[ids].astype(np.float64)
        if top_p < 1:
            order = np.argsort(-values, kind="stable")
            probabilities = np.exp(values[order] - values[order[0]])
            cumulative = np.cumsum(probabilities / probabilities.sum())
            keep = order[:int(np.searchsorted(cumulative, top_p)) + 1]
            ids, values = ids[keep], values[keep]
        weights = np.exp((values - values.max()) / temperature)
        return int(ids[rng.choice(len(ids), p=weights / weights.sum())])

    return sample


def generate_command(args):
    """`recscore generate PROMPT`: stream the continuation to stdout, timings to stderr."""
    import sys
    if args.threads:
        import numba
        numba.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        llm = LLM.from_gguf(args.model, **({} if args.context is None else {"context": args.context}))
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"recscore generate: {error}", file=sys.stderr)
        return 2
    loaded = time.perf_counter() - start
    try:
        for piece in llm.stream(args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed, stop=args.stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (ValueError, TypeError) as error:
        print(f"\nrecscore generate: {error}", file=sys.stderr)
        return 2
    stats = llm.stats
    print(f"\n[load {loaded:.2f} s; prompt {stats.prompt_tokens} tokens, first token after "
          f"{stats.first_token_seconds * 1e3:.0f} ms; {stats.generated_tokens} tokens generated, "
          f"{stats.decode_tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return 0
