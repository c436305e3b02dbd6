"""The SentencePiece tokenizer a GGUF file describes (tokenizer.ggml.model "llama"), on the `tokenizers`
library, giving llama.cpp's token ids.

llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm) first cuts out every USER_DEFINED token (runs
of newlines, spaces and tabs, HTML tags), and CONTROL tokens too when asked to parse special tokens;
then in each remaining piece it writes spaces as U+2581 and, starting from single characters,
repeatedly merges the adjacent pair whose concatenation is the vocabulary token with the highest score;
characters left outside the vocabulary become <0xXX> byte tokens. The same machine here: a
`tokenizers` BPE whose merges are every split of every vocabulary token into two vocabulary tokens,
ranked by the merged token's score (as transformers' GGUF converter derives merges for Gemma), with
byte fallback, a normalizer writing spaces as U+2581, and the USER_DEFINED / CONTROL tokens as added
tokens matched on the raw text.
"""
import ctypes
import hashlib
import os
import threading

import numpy as np
from tokenizers import AddedToken, Tokenizer, models, normalizers

from .gguf_file import cache_dir

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"     # SentencePiece's visible space
UNKNOWN_TEXT = "\u2585".encode()   # what llama.cpp prints for an unknown token
MERGES_FORMAT = 1                  # version of the cached merge table's layout


class GGUFTokenizer:
    """encode(text) -> token ids as llama.cpp gives them; decode(ids) -> text; token_bytes(id) for streaming."""

    def __init__(self, tokens, scores, token_types, *, bos_id, eos_id, unknown_id=None, add_bos=True,
                 end_of_turn_id=None):
        if not (len(tokens) == len(scores) == len(token_types)):
            raise ValueError(f"tokenizer metadata disagrees: {len(tokens)} tokens, {len(scores)} scores, "
                             f"{len(token_types)} token types")
        self.tokens = list(tokens)
        self.token_types = np.asarray(token_types, dtype=np.int32)
        self.bos_id, self.eos_id, self.add_bos = int(bos_id), int(eos_id), bool(add_bos)
        # generation ends at any of these (llama.cpp's end-of-generation tokens)
        self.end_ids = frozenset(i for i in (self.eos_id, end_of_turn_id) if i is not None)
        unknown = None if unknown_id is None else self.tokens[unknown_id]
        self._plain = _build(self.tokens, np.asarray(scores, dtype=np.float32), self.token_types, unknown)
        _return_freed_heap()   # the build's ~1M transient Python strings and tuples: ~45 MB back to the OS
        self._plain.encode_special_tokens = True    # control tokens in the text are text (llama.cpp's special=false)
        self._parsing = None    # built on first encode(..., special=True)
        self._lock = threading.Lock()
        self._bytes = None

    @classmethod
    def from_metadata(cls, meta, source="GGUF file"):
        """From a GGUF metadata dict (see gguf_file.metadata); ValueError naming `source` if it is not one."""
        model = meta.get("tokenizer.ggml.model")
        if model != "llama":
            raise ValueError(f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece ('llama') is supported")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            if key not in meta:
                raise ValueError(f"{source}: metadata has no {key}")
        tokens = meta["tokenizer.ggml.tokens"]
        end_of_turn = np.flatnonzero(tokens == "<end_of_turn>")
        return cls(tokens, meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"],
                   bos_id=meta["tokenizer.ggml.bos_token_id"], eos_id=meta["tokenizer.ggml.eos_token_id"],
                   unknown_id=meta.get("tokenizer.ggml.unknown_token_id"),
                   add_bos=meta.get("tokenizer.ggml.add_bos_token", True),
                   end_of_turn_id=int(end_of_turn[0]) if end_of_turn.size else None)

    @property
    def vocab_size(self):
        return len(self.tokens)

    def encode(self, text, *, add_bos=None, special=False):
        """Token ids of `text` (list of int), BOS first when `add_bos` (default: the file's add_bos_token).

        special=True also reads control tokens written in the text ("<start_of_turn>") as those tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tokenizer(special).encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if (self.add_bos if add_bos is None else add_bos) else ids

    def encode_batch(self, texts, *, add_bos=None, special=False):
        """encode() for a list of texts, in one call into `tokenizers` (parallel where it helps)."""
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be a list of str")
        encodings = self._tokenizer(special).encode_batch(list(texts), add_special_tokens=False)
        bos = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        return [bos + encoding.ids for encoding in encodings]

    def token_bytes(self, token_id):
        """The bytes token `token_id` stands for in text (llama.cpp's token_to_piece; control tokens: b"")."""
        if self._bytes is None:
            self._bytes = [_piece_bytes(text, kind) for text, kind in zip(self.tokens, self.token_types.tolist())]
        return self._bytes[token_id]

    def decode(self, ids):
        """The text of token ids (invalid UTF-8 from byte tokens replaced by U+FFFD)."""
        for position, token in enumerate(ids):
            if not 0 <= token < self.vocab_size:
                raise IndexError(f"ids[{position}] = {token} is not a token id (vocabulary of {self.vocab_size})")
        return b"".join(self.token_bytes(int(token)) for token in ids).decode("utf-8", errors="replace")

    def _tokenizer(self, special):
        if not special:
            return self._plain
        with self._lock:
            if self._parsing is None:
                self._parsing = Tokenizer.from_str(self._plain.to_str())
                self._parsing.encode_special_tokens = False
        return self._parsing


def _build(tokens, scores, token_types, unknown):
    vocab = {}
    for index, text in enumerate(tokens):
        vocab.setdefault(text, index)   # a duplicated text keeps its first id, as llama.cpp's lookup does
    merges = _cached_merges(tokens, scores, token_types, vocab)
    pairs = [(tokens[i][:cut], tokens[i][cut:]) for i, cut in zip(merges[:, 0].tolist(), merges[:, 1].tolist())]
    model = models.BPE(vocab=vocab, merges=pairs, byte_fallback=True, unk_token=unknown)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False, special=False)
                          for i in np.flatnonzero(token_types == USER_DEFINED)])
    tokenizer.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                                  for i in np.flatnonzero(token_types == CONTROL)])
    return tokenizer


def _merges(tokens, scores, token_types, vocab):
    """Every split of a vocabulary token into two vocabulary tokens, as (token id, cut) int32 rows,
    best merged score first (ties: lower id, shorter left part)."""
    user_defined = (token_types == USER_DEFINED).tolist()   # cut out of the text before any merge
    found = []
    for index, text in enumerate(tokens):
        if len(text) < 2 or user_defined[index]:
            continue
        for cut in range(1, len(text)):
            if text[:cut] in vocab and text[cut:] in vocab:
                found.append((index, cut))
    merges = np.array(found, dtype=np.int32).reshape(-1, 2)
    return merges[np.lexsort((merges[:, 1], merges[:, 0], -scores[merges[:, 0]]))]


def _cached_merges(tokens, scores, token_types, vocab):
    """_merges(), kept in the cache folder under a hash of the vocabulary (deriving them takes ~1 s)."""
    digest = hashlib.sha256("\0".join(tokens).encode())
    digest.update(np.ascontiguousarray(scores, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(token_types, dtype=np.int32).tobytes())
    path = cache_dir() / f"spm-merges-{MERGES_FORMAT}-{digest.hexdigest()[:24]}.npy"
    try:
        return np.load(path)
    except (OSError, ValueError):
        pass
    merges = _merges(tokens, scores, token_types, vocab)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial.npy")
        np.save(partial, merges)
        os.replace(partial, path)
    except OSError:
        pass   # an unwritable cache folder only costs the derivation next time
    return merges


def _return_freed_heap():
    """glibc keeps freed heap pages in the process; malloc_trim hands them back (elsewhere: nothing)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _piece_bytes(text, kind):
    if kind == NORMAL:
        return text.replace(SPACE, " ").encode()
    if kind == BYTE:
        return bytes([int(text[3:5], 16)])   # "<0xAB>"
    if kind == USER_DEFINED:
        return text.encode()
    if kind == UNKNOWN:
        return UNKNOWN_TEXT
    return b""   # CONTROL, UNUSED
