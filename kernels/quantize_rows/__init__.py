"""Row storage for embedding tables and item corpora: `quantize_rows`, and `RowTable`
(defined in kernels/_rows.py, with the row helpers lookups and top-k share; imported here too)."""

import numpy as np

from .._backend import backend_module, bf16_bits_to_float32, choose_backend, read_only_view, to_numpy, warn_once
from .._rows import ROW_DTYPES, RowTable, as_row_table, has_contiguous_rows  # noqa: F401  (the old import path)
from .._validate import check_array, check_choice, check_finite

# Largest magnitudes stored: each format's largest finite value; for int8/int4, 2**126, so that a row's
# range (max - min), its scale and every dequantized `code * scale + bias` stay finite in float32.
_FINITE_LIMIT = {"fp32": 3.4028234663852886e38, "fp16": 65504.0, "bf16": 3.3895313892515355e38,
                 "int8": 2.0 ** 126, "int4": 2.0 ** 126}


def quantize_rows(weights, dtype):
    """Store a float (R, D) table as `dtype`: "fp32", "fp16", "bf16", "int8" or "int4".

    Returns a RowTable on the same kind of array and device as `weights`. On the host, new
    storage starts a cache line (aligned_empty) and is read-only; fp32 of a row-major float32
    array is that array.
    """
    check_choice("dtype", dtype, ROW_DTYPES)
    kind = check_array("weights", weights, 2, ("float32", "float16", "bfloat16", "float64"))
    check_finite("weights", weights)
    backend = choose_backend(kind)
    if backend == "triton":
        warn_once("quantize_rows-host", "quantize_rows has no GPU kernel: CUDA weights are quantized on the host")
        backend = "cpu"
    host = to_numpy(weights)
    if host.dtype == np.uint16:  # bf16 bits
        host = bf16_bits_to_float32(host)
    limit = _FINITE_LIMIT.get(dtype)
    if limit is not None and host.size and float(np.abs(host).max()) > limit:
        raise ValueError(f"weights has values outside the {dtype} range (largest magnitude {limit:g})")
    parts = backend_module(__name__, backend).quantize(host, dtype)
    if kind != "numpy":
        return RowTable(dtype, weights.shape, *parts).to(weights.device)
    owned = [None if part is None else part if np.may_share_memory(part, host) else read_only_view(part)
             for part in parts]
    return RowTable(dtype, weights.shape, *owned)
