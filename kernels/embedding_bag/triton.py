"""Pooled embedding-bag lookup in Triton: every table of a TableBatch in one launch.

One program pools one bag of one table over a BLOCK_D slice of its columns, BLOCK_L indices
at a time: a (BLOCK_L, BLOCK_D) tile of rows is loaded (contiguous along D, so row loads
vectorise), dequantized in registers (int8/int4 codes * scale + bias, where sum and mean fold
scale and bias into the row weights; fp16/bf16 widened), and reduced into a float32 accumulator.

One launch for all dtypes, with no copy of any table: the tables are addressed as byte
offsets from one base pointer (the first table's storage; all tables live on one device, in
one flat address space), and each table's row of `meta` says where its rows, scales and biases
are, its dtype, R, D, row stride and output column. The dtype branch runs per program on a
uniform value (no divergence inside a program); constexpr flags drop the branches for dtypes
the batch does not hold. Packing tables into per-dtype buffers would copy every table.
"""
import math
import threading

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from .._triton_launch import LaunchCache
from .._triton_offsets import row_starts
from ...bindings._cpu import DTYPE_CODES, POOLING_CODES

FP32, FP16, BF16, INT8, INT4 = (tl.constexpr(DTYPE_CODES[name]) for name in ("fp32", "fp16", "bf16", "int8", "int4"))
# Bits of DTYPE_FLAGS (1 << code): which dtypes a batch holds.
FP32_BIT, FP16_BIT, BF16_BIT, INT8_BIT, INT4_BIT = (tl.constexpr(1 << DTYPE_CODES[name])
                                                    for name in ("fp32", "fp16", "bf16", "int8", "int4"))
MEAN, MAX = tl.constexpr(POOLING_CODES["mean"]), tl.constexpr(POOLING_CODES["max"])
QUANTIZED_BITS = tl.constexpr(INT8_BIT | INT4_BIT)
# Columns of `meta`, one row per table (int64).
DATA, SCALE, BIAS, DTYPE, ROWS, DIM, ROW_BYTES, COLUMN, QPARAM_STRIDE = (tl.constexpr(column) for column in range(9))
META_COLUMNS = tl.constexpr(9)


def _configs():
    if triton_interpreted():  # the interpreter cannot time configs: one small tile
        return [triton.Config({"BLOCK_L": 8, "BLOCK_D": 32}, num_warps=1)]
    # BLOCK_L = 32 puts a whole typical bag's rows in flight at once. Tiles stop at 4096 elements
    # (32 x 256 and up needed 222-255 registers a thread on sm_90: few programs an SM).
    tiles = [(block_l, block_d, max(1, min(8, block_l * block_d // 512)))
             for block_d in (32, 64, 128, 256, 512) for block_l in (8, 32) if block_l * block_d <= 4096]
    # A 32-row tile in one warp keeps the most rows in flight an SM where its registers allow (D <= 64):
    # on an H100 a bare gather of 64-byte rows reads 30 G rows/s at 32 rows a program and 12.6 G at 8,
    # and int8 lookups at B = 16384 went from 53 us to 30 (bench/notes/results-2026-11.md, the configuration sweep).
    tiles += [(32, block_d, 1) for block_d in (32, 64)]
    return [triton.Config({"BLOCK_L": block_l, "BLOCK_D": block_d}, num_warps=warps) for block_l, block_d, warps in tiles]


def _prune(configs, named_args, **kwargs):
    """Only the tiles that cover D in one column block, or for D > 64 also two (more programs when
    bags are few): 2 to 5 configs to time, not 10. At D <= 64 the half-width tiles lost every case
    of the H100 configuration sweep, yet the autotuner's timing of a 10 us call picked one."""
    widest = max(32, min(512, triton.next_power_of_2(max(1, int(named_args["MAX_DIM"])))))
    widths = (widest,) if widest <= 64 else (widest, widest // 2)
    return [c for c in configs if c.kwargs["BLOCK_D"] in widths] or configs


@triton.jit
def _pool(acc, values, tile_mask, weight, POOLING: tl.constexpr):
    """acc (BLOCK_D,) pooled with a (BLOCK_L, BLOCK_D) tile of dequantized rows: max, or the weighted sum."""
    if POOLING == MAX:
        return tl.maximum(acc, tl.max(tl.where(tile_mask, values, float("-inf")), axis=0))
    # Masked-off rows load as 0 and weigh 0; masked-off columns are never stored.
    return acc + tl.sum(values * weight[:, None], axis=0)


@triton.jit
def _pool_codes(acc, codes, scale, bias, tile_mask, weight, POOLING: tl.constexpr):
    """acc pooled with a tile of int8/int4 codes, each row dequantized as codes * scale + bias."""
    if POOLING == MAX:
        return _pool(acc, codes.to(tl.float32) * scale[:, None] + bias[:, None], tile_mask, weight, POOLING)
    # sum_l w_l (s_l c_ld + b_l) = sum_l (w_l s_l) c_ld + sum_l w_l b_l: the per-row factors fold
    # before the tile, and no dequantized float tile is formed: 72 registers instead of 96 at
    # 32 x 64 int8 in one warp on sm_90 (the H100 time moved 2-4%: bench/notes/results-2026-11.md).
    return acc + tl.sum(codes.to(tl.float32) * (weight * scale)[:, None], axis=0) + tl.sum(weight * bias, axis=0)


@triton.autotune(configs=_configs(), key=["MAX_DIM", "DTYPE_FLAGS", "POOLING", "DIM_MULTIPLE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _lookup_kernel(base_ptr, meta_ptr, indices_ptr, offsets_ptr, weights_ptr, out_ptr, errors_ptr,
                   bags_per_table, total_dim, n_indices, n_segments,
                   MAX_DIM, DTYPE_FLAGS: tl.constexpr, POOLING: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                   ROW_ALIGN: tl.constexpr, DIM_MULTIPLE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    segment = tl.program_id(0)
    table = segment // bags_per_table
    bag = segment - table * bags_per_table
    meta = meta_ptr + table * META_COLUMNS
    data_offset = tl.load(meta + DATA)
    scale_offset = tl.load(meta + SCALE)
    bias_offset = tl.load(meta + BIAS)
    dtype = tl.load(meta + DTYPE)
    rows = tl.load(meta + ROWS)
    # Every table's D and row start are multiples of these (the host checked): they let the
    # compiler vectorise row loads and the d < D mask.
    dim = tl.multiple_of(tl.load(meta + DIM), DIM_MULTIPLE)
    row_bytes = tl.load(meta + ROW_BYTES)
    qparam_stride = tl.load(meta + QPARAM_STRIDE)   # 4, or the fused row's bytes (codes, scale, bias)
    column = tl.load(meta + COLUMN)

    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < dim
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    # The checks ride along: errors[0] flags bad offsets, errors[1] an index outside [-1, R),
    # errors[2] a per-sample weight that is NaN or inf.
    # Positions are masked to [0, n_indices), so bad offsets never read outside `indices`.
    bad_offsets = (start < 0) | (end < start) | (end > n_indices)
    bad_offsets |= (segment == 0) & (start != 0)
    bad_offsets |= (segment == n_segments - 1) & (end != n_indices)
    tl.store(errors_ptr, 1, mask=bad_offsets)
    start = tl.maximum(start, 0)
    end = tl.minimum(end, n_indices)
    bad_indices = 0
    bad_weights = 0
    if POOLING == MAX:
        acc = tl.full([BLOCK_D], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_D], tl.float32)
    count = 0
    for i in range(start, end, BLOCK_L):
        position = i + tl.arange(0, BLOCK_L)
        in_bag = position < end
        index = tl.load(indices_ptr + position, mask=in_bag, other=-1).to(tl.int64)
        valid = in_bag & (index >= 0) & (index < rows)  # -1 padding; out of range with bounds="skip"
        bad_indices += tl.sum(((index < -1) | (index >= rows)).to(tl.int32), axis=0)
        count += tl.sum(valid.to(tl.int32), axis=0)
        tile_mask = valid[:, None] & d_mask[None, :]
        row_start = data_offset + row_starts(index, row_bytes)
        row_start = tl.multiple_of(row_start, ROW_ALIGN)
        row = base_ptr + row_start  # (BLOCK_L,) byte pointers to the rows, then typed per dtype
        if HAS_WEIGHTS:
            weight = tl.load(weights_ptr + position, mask=in_bag, other=0.0)
            bad_weights += tl.sum(((weight != weight) | (tl.abs(weight) == float("inf"))).to(tl.int32), axis=0)
            weight = tl.where(valid, weight, 0.0)
        else:
            weight = valid.to(tl.float32)
        # Each dtype pools its own tile into `acc`: a tile assigned in branches and pooled after them
        # would be live across the branches whole, as float32 (219 registers at 32 x 64 int8, one warp).
        if FP32_BIT & DTYPE_FLAGS:
            if dtype == FP32:
                values = tl.load(row.to(tl.pointer_type(tl.float32))[:, None] + d[None, :], mask=tile_mask, other=0.0)
                acc = _pool(acc, values, tile_mask, weight, POOLING)
        if FP16_BIT & DTYPE_FLAGS:
            if dtype == FP16:
                values = tl.load(row.to(tl.pointer_type(tl.float16))[:, None] + d[None, :], mask=tile_mask, other=0.0)
                acc = _pool(acc, values.to(tl.float32), tile_mask, weight, POOLING)
        if BF16_BIT & DTYPE_FLAGS:
            if dtype == BF16:
                values = tl.load(row.to(tl.pointer_type(tl.bfloat16))[:, None] + d[None, :], mask=tile_mask,
                                 other=0.0)
                acc = _pool(acc, values.to(tl.float32), tile_mask, weight, POOLING)
        if QUANTIZED_BITS & DTYPE_FLAGS:
            if (dtype == INT8) | (dtype == INT4):
                qparams = row_starts(index, qparam_stride)
                scale = tl.load((base_ptr + scale_offset + qparams).to(tl.pointer_type(tl.float32)),
                                mask=valid, other=0.0)
                bias = tl.load((base_ptr + bias_offset + qparams).to(tl.pointer_type(tl.float32)),
                               mask=valid, other=0.0)
                if INT8_BIT & DTYPE_FLAGS:
                    if dtype == INT8:
                        codes = tl.load(row[:, None] + d[None, :], mask=tile_mask, other=0)
                        acc = _pool_codes(acc, codes, scale, bias, tile_mask, weight, POOLING)
                if INT4_BIT & DTYPE_FLAGS:
                    if dtype == INT4:  # two codes a byte, low nibble first
                        packed = tl.load(row[:, None] + d[None, :] // 2, mask=tile_mask, other=0)
                        codes = (packed >> ((d[None, :] % 2) * 4).to(tl.uint8)) & 15
                        acc = _pool_codes(acc, codes, scale, bias, tile_mask, weight, POOLING)
    if POOLING == MEAN:
        acc = acc / tl.maximum(count, 1).to(tl.float32)
    acc = tl.where(count > 0, acc, 0.0)  # an empty (or all-padding) bag gives zeros
    tl.store(out_ptr + row_starts(bag, total_dim) + column + d, acc, mask=d_mask)
    tl.store(errors_ptr + 1, 1, mask=bad_indices > 0)
    tl.store(errors_ptr + 2, 1, mask=bad_weights > 0)


_launch_lookup = LaunchCache(_lookup_kernel)
_meta_cache = {}
_meta_cache_lock = threading.Lock()
_thread_flag_buffers = threading.local()
META_CACHE_SIZE = 4096


def _meta_on_device(rows_meta, device):
    """`meta` as a device tensor, cached by its values: `embedding_bag` builds a new one-table
    batch on every call, and a fresh host-to-device copy would wait for the GPU each time."""
    key = (str(device), tuple(map(tuple, rows_meta)))
    with _meta_cache_lock:
        meta = _meta_cache.get(key)
        if meta is None:
            if len(_meta_cache) >= META_CACHE_SIZE:
                _meta_cache.clear()
            meta = _meta_cache[key] = torch.tensor(rows_meta, dtype=torch.int64, device=device)
    return meta


def _with_unit_column_stride(data):
    """`data` whose last stride is 1, as the kernel's byte addressing needs: a view of a (R, 1) column
    of any stride (torch calls it contiguous, and contiguous() leaves it as it is), else a copy."""
    if data.stride(-1) == 1:
        return data
    if data.shape[-1] == 1:
        return data.as_strided(data.shape, (data.stride(0), 1))
    return data.contiguous()


def _prepare(batch):
    """The per-table `meta` rows (offsets from the first table's storage), built once per batch."""
    with batch.lock:
        prepared = batch.prepared.get("triton")
        if prepared is None:
            # Every address is an offset from one base: the first table with rows (a one-byte
            # buffer if none has any: then no row is ever read).
            first = next((t.data for t in batch.tables if t.data.numel() > 0), None)
            if first is None:
                base = torch.zeros(1, dtype=torch.uint8, device=batch.tables[0].data.device)
            else:
                base = _with_unit_column_stride(first)
            base_address = base.data_ptr()
            rows_meta, buffers, column, flags, row_align, dim_multiple = [], [base], 0, 0, 16, 16
            for table in batch.tables:
                rows, dim = table.shape
                # Rows may be strided (RowTable.fused(): codes, scale and bias side by side in one row).
                data = table.data
                if data is first:
                    data = base
                elif data.numel() > 0:
                    data = _with_unit_column_stride(data)
                code = DTYPE_CODES[table.dtype]
                scale = bias = data
                qparam_stride = 4
                if table.scale is not None:
                    scale, bias = table.scale, table.bias
                    if scale.stride(0) != bias.stride(0):
                        scale, bias = scale.contiguous(), bias.contiguous()
                    qparam_stride = scale.stride(0) * 4
                row_bytes = data.stride(0) * data.element_size() if rows else 0
                buffers += [data, scale, bias]
                offsets = [p.data_ptr() - base_address for p in (data, scale, bias)]
                if data.numel() > 0:  # an empty table's address is never read
                    row_align = math.gcd(row_align, row_bytes, offsets[0])
                dim_multiple = math.gcd(dim_multiple, dim)
                rows_meta.append(offsets + [code, rows, dim, row_bytes, column, qparam_stride])
                column += dim
                flags |= 1 << code
            meta = _meta_on_device(rows_meta, base.device)
            # `buffers` keeps every buffer whose address is in `meta` alive.
            prepared = batch.prepared["triton"] = (meta, base.view(torch.uint8), column, flags,
                                                   max(batch.dims), row_align, dim_multiple, buffers)
    return prepared


def thread_flags(batch):
    """A zeroed int32 (3,) error-flag buffer on the batch's device for the calling thread's
    `lookup` calls, which read it back before returning (read_thread_flags): calls of one thread
    never overlap, so one buffer serves them all, with no allocation or zero fill a call."""
    device = batch.tables[0].data.device   # a TableBatch's tables share one device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lookup waits for the GPU to read its error flags, so it cannot be captured in "
                           "a CUDA graph: capture TableBatch.lookup_with_flags")
    buffers = _thread_flag_buffers.__dict__.setdefault("by_device", {})
    if device not in buffers:
        buffers[device] = torch.zeros(3, dtype=torch.int32, device=device)
    return buffers[device]


def read_thread_flags(flags):
    """The flags a `lookup` set in its thread's buffer, as a list (a wait for the GPU); a set flag
    is cleared before returning."""
    values = flags.tolist()
    if any(values):
        clear_flags(flags)
    return values


def clear_flags(flags):
    """Zero a thread's flag buffer and wait for it: the thread's next call may run on another stream."""
    flags.zero_()
    if flags.is_cuda:
        torch.cuda.current_stream(flags.device).synchronize()


def lookup(batch, indices, offsets, bags_per_table, pooling, per_sample_weights, errors=None):
    """Same contract as reference.lookup, on torch tensors: float32 (B, sum of D_t) on their device,
    and int32 errors[3] on the device: errors[0] != 0 if `offsets` is malformed, errors[1] != 0 if
    an index lies outside [-1, R_t) (such an index is skipped, as with bounds="skip"), errors[2] != 0
    if a per-sample weight is NaN or inf. `errors`: the buffer to set them in (none is cleared), or
    None for a new zeroed one.

    Nothing here waits for the GPU: the caller reads `errors` (one sync) and raises.
    """
    meta, base, total_dim, flags, max_dim, row_align, dim_multiple, _ = _prepare(batch)
    assert indices.device == base.device and offsets.device == base.device, "inputs must be on the tables' device"
    assert indices.is_contiguous() and offsets.is_contiguous()
    assert per_sample_weights is None or per_sample_weights.is_contiguous()
    n_segments = batch.num_tables * bags_per_table
    assert n_segments > 0 and total_dim > 0, "the caller checks offsets on the host when there is nothing to launch"
    out = torch.empty((bags_per_table, total_dim), dtype=torch.float32, device=base.device)
    if errors is None:
        errors = torch.zeros(3, dtype=torch.int32, device=base.device)
    weights = per_sample_weights if per_sample_weights is not None else out
    grid = lambda config: (n_segments, -(-max_dim // config["BLOCK_D"]))  # noqa: E731  (triton.cdiv costs 2 us in 3.9)
    _launch_lookup(grid, base, meta, indices, offsets, weights, out, errors, bags_per_table, total_dim,
                   indices.shape[0], n_segments, max_dim, flags, POOLING_CODES[pooling],
                   per_sample_weights is not None, row_align, dim_multiple)
    return out, errors
