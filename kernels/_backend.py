"""Which backend runs a call, and the array conversions every operation shares.

The backend follows the data: NumPy arrays and CPU tensors run the CPU kernels, CUDA
tensors run the Triton kernels. `use_backend` forces one for the calls made inside it,
in the calling thread only (a ContextVar, so host threads never see each other's choice).
torch is imported only when the caller hands us a tensor: the CPU path needs NumPy alone.
"""
import contextlib
import contextvars
import importlib
import math
import os
import sys
import threading
import warnings

import numpy as np

BACKENDS = ("reference", "cpu", "triton")

_forced_backend = contextvars.ContextVar("recscore_backend", default=None)


@contextlib.contextmanager
def use_backend(name):
    """Force `name` ("reference", "cpu" or "triton") for the calls made inside the block."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    token = _forced_backend.set(name)
    try:
        yield
    finally:
        _forced_backend.reset(token)


_backend_modules = {}


def backend_module(package, name):
    """The module `name` ("reference", "cpu", "triton") of an operation's package, imported on first use
    (so NumPy-only hosts never import torch or triton, and Numba compiles only what is called), then
    kept: the import machinery costs 1 us a call, a tenth of a small lookup."""
    module = _backend_modules.get((package, name))
    if module is None:
        module = _backend_modules[(package, name)] = importlib.import_module(f".{name}", package)
    return module


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET") == "1"


_warned = set()
_warned_lock = threading.Lock()


def warn_once(key, message):
    """Warn about a fallback the first time it happens in this process."""
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# Array kinds
# ---------------------------------------------------------------------------------------

def is_tensor(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def array_kind(x):
    """'numpy', 'torch' (CPU tensor) or 'cuda' (CUDA tensor)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_tensor(x):
        return "cuda" if x.is_cuda else "torch"
    raise TypeError(f"expected a NumPy array or a torch.Tensor, got {type(x).__name__}")


def choose_backend(kind):
    """The backend for data of `kind`, honouring `use_backend`."""
    forced = _forced_backend.get()
    if forced == "triton":
        if kind != "cuda" and not triton_interpreted():
            raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return "triton"
    if forced is not None:
        return forced
    if kind == "cuda":
        if triton_available():
            return "triton"
        warn_once("no-triton", "triton is not importable: CUDA inputs run on the CPU kernels (copied to host and back)")
        return "cpu"
    return "cpu"


_triton_ok = None


def triton_available():
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            _triton_ok = True
        except ImportError:
            _triton_ok = False
    return _triton_ok


# ---------------------------------------------------------------------------------------
# Conversions. NumPy has no bfloat16: bf16 data lives in NumPy as its uint16 bit pattern.
# ---------------------------------------------------------------------------------------

_dtype_names = {}  # dtype -> name: NumPy's dtype.name takes about 2 us, a per-call cost on small inputs


def dtype_name(x):
    """A short dtype name for arrays and tensors alike: 'float32', 'bfloat16', 'int64', ..."""
    dtype = x.dtype
    name = _dtype_names.get(dtype)
    if name is None:
        name = dtype.name if isinstance(dtype, np.dtype) else str(dtype).removeprefix("torch.")
        _dtype_names[dtype] = name
    return name


CACHE_LINE_BYTES = 64


def aligned_empty(shape, dtype, alignment=CACHE_LINE_BYTES):
    """np.empty whose first byte starts a cache line (`alignment` bytes), where torch's CPU
    allocator puts every tensor. glibc's malloc, under NumPy, puts a large array 16 bytes past
    a line, so that each 256-byte fp32 row spans 5 lines instead of 4 and each 64-byte int8 row
    2 instead of 1: a random-row gather reads 25-100% more lines. A copy or unpickled array is
    placed as NumPy places it again."""
    dtype = np.dtype(dtype)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % dtype.alignment:
        raise ValueError(f"alignment must be a positive multiple of {dtype.alignment} bytes for {dtype}, "
                         f"got {alignment!r}")
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if any(n < 0 for n in shape):   # np.ndarray would read -1 as "the rest of the buffer"
        raise ValueError(f"negative dimensions are not allowed, got shape {shape}")
    raw = np.empty(math.prod(shape) * dtype.itemsize + alignment, np.uint8)   # Python ints: no wrap-around
    return np.ndarray(shape, dtype, buffer=raw, offset=-raw.ctypes.data % alignment)   # keeps `raw` alive


def aligned_copy(array, dtype):
    """array cast to dtype (NumPy's casting) in new storage that starts a cache line."""
    out = aligned_empty(array.shape, dtype)
    out[...] = array
    return out


def to_numpy(x):
    """A NumPy view of x (CUDA tensors are copied to the host); bf16 comes back as uint16 bits."""
    if isinstance(x, np.ndarray):
        return x
    import torch
    t = x.detach()
    if t.is_cuda:
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def bf16_bits_to_float32(bits):
    """float32 values of bfloat16 bits, in new storage that starts a cache line (aligned_empty)."""
    wide = aligned_copy(bits, np.uint32)
    wide <<= 16
    return wide.view(np.float32)


def to_numpy_float32(x):
    """A float32 NumPy array with the values of x (a view when x already is one on the host)."""
    host = to_numpy(x)
    if host.dtype == np.uint16:
        return bf16_bits_to_float32(host)
    return np.ascontiguousarray(host, dtype=np.float32)


def read_only_view(array):
    """A view of a NumPy array that cannot be written through (the array itself stays as it is)."""
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view


def to_torch(x, device="cpu", bf16=False):
    """A tensor view of a NumPy array on `device` (zero-copy on the CPU, except for a read-only
    array, which torch could write through: that is copied); uint16 -> bfloat16 if bf16."""
    import torch
    if is_tensor(x):
        return x.to(device)
    x = np.ascontiguousarray(x)
    # NumPy calls a (1, D) array with a negative stride contiguous
    if not x.flags.writeable or any(stride < 0 for stride in x.strides):
        x = x.copy()
    t = torch.from_numpy(x)
    if bf16:
        t = t.view(torch.bfloat16)
    return t.to(device)


def like(result, kind, device=None):
    """Return a NumPy result as the caller's kind of array: NumPy, CPU tensor or CUDA tensor."""
    if kind == "numpy":
        return to_numpy(result)
    import torch
    if isinstance(result, np.ndarray):
        result = torch.from_numpy(result)
    return result.to(device) if device is not None else result
