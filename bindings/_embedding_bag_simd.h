/* The row loops of the pooled embedding-bag lookup, written once against _simd.h and compiled once
 * per level (setup.py). Included without SIMD_LEVEL (by the driver, _embedding_bag.h), this file
 * gives only what both sides share: the dtype and pooling codes, the table description's columns
 * and a run's layout.
 *
 * FBGEMM's CPU kernel, written out: per run of bags of one table, a row loop that keeps the pooled
 * row in registers (EB_BLOCK_VECTORS vectors; wider rows are pooled one block of columns at a
 * time), as two partial sums (even and odd positions: two independent add chains) where the
 * registers hold both, and prefetches rows ahead in the index stream into L2, across bag
 * boundaries. fp16 and bf16 widen in registers; int8/int4 rows stand for codes * scale + bias, so
 * a weighted sum adds codes * (w * scale) per row and sum(w * bias) once per bag. One specialised
 * loop per (dtype, vectors, index width, way of pooling): the vector loop unrolls and the
 * accumulators stay in registers. Measurements behind the constants: bench/notes/cpu-embedding.md.
 *
 * Bounds: an index outside [0, R) is skipped (-1 padding, or bounds="skip"); with `check` set, one
 * other than -1 stops the run, which returns its position. The callers validated shapes, offsets
 * and the table descriptions: this code trusts them.
 */
#ifndef EB_SHARED_H
#define EB_SHARED_H

#include <stdint.h>

#include "_codes.h"

/* Row dtypes and pooling modes, by the names the row loops use. */
enum { EB_FP32 = RS_DTYPE_FP32, EB_FP16 = RS_DTYPE_FP16, EB_BF16 = RS_DTYPE_BF16, EB_INT8 = RS_DTYPE_INT8,
       EB_INT4 = RS_DTYPE_INT4, EB_DTYPES = RS_DTYPES };
enum { EB_SUM = RS_POOL_SUM, EB_MEAN = RS_POOL_MEAN, EB_MAX = RS_POOL_MAX, EB_POOLINGS = RS_POOLINGS };
/* Columns of the int64 (T, EB_FIELDS) table description: addresses of row 0 and of row 0's
 * float32 scale (bias follows it; int8/int4 only), dtype, R, D, bytes from one row to the next
 * (of the rows and of the qparams), and the table's first output column. */
enum { EB_DATA, EB_QPARAMS, EB_DTYPE, EB_ROWS, EB_DIM, EB_ROW_BYTES, EB_COLUMN, EB_QPARAMS_STRIDE, EB_FIELDS };

/* Bags first..last-1 of one table, all its columns. */
typedef struct {
    const uint8_t *data;        /* row 0; the table's bytes end where row R-1's D values do */
    const uint8_t *qparams;     /* row r's float32 scale, bias at qparams + r * qparams_stride; NULL for float rows */
    int64_t qparams_stride;
    int64_t rows, row_bytes, dim;
    int dtype;
    const void *indices;
    int index64;                /* indices are int64 (else int32) */
    const int64_t *offsets;     /* segment s: indices[offsets[s] : offsets[s + 1]] */
    const float *weights;       /* NULL: unweighted */
    int64_t first, last;        /* segments */
    int64_t lookahead_end;      /* rows are prefetched from index positions below it only */
    float *out;                 /* output row of segment `first`, the table's first column */
    int64_t out_stride;
    int pooling, check;
} eb_run;

#endif

#if defined(SIMD_LEVEL) && !defined(EB_SIMD_H)
#define EB_SIMD_H

#include "_simd.h"

/* Register blocking per level: vectors of columns pooled in registers at a time (rows of more
 * columns are pooled one block after another, bag by bag), and up to how many vectors the pooled
 * row is kept as two chains (both must fit beside a load and the scale). */
#if SIMD_LEVEL >= 2
#define EB_BLOCK_VECTORS 8          /* 128 columns: 16 of the 32 zmm for two chains */
#define EB_TWO_CHAIN_VECTORS 8
#elif SIMD_LEVEL == 1
#define EB_BLOCK_VECTORS 8          /* 64 columns; 16 ymm hold two chains of 6 vectors */
#define EB_TWO_CHAIN_VECTORS 6
#else
#define EB_BLOCK_VECTORS 8          /* plain C: the pooled row lives in memory */
#define EB_TWO_CHAIN_VECTORS 4
#endif
#define EB_BLOCK_COLUMNS (VF_LANES * EB_BLOCK_VECTORS)
/* No masked load in the row loop, at any level: a row's last vector is read so that it ends with
 * the row (overlapping the vector before it, whose columns it sums alike), and so is a wide row's
 * last block. Rows narrower than a vector are read a whole vector from their start: in place where
 * the table goes on after it, else from a padded copy of the table's last rows (fewer than
 * EB_TAIL_ROWS, the bytes of a vector), made once per run. */
#define EB_TAIL_ROWS (VF_LANES * 4)

static const int eb_element_bits[EB_DTYPES] = { [EB_FP32] = 32, [EB_FP16] = 16, [EB_BF16] = 16, [EB_INT8] = 8, [EB_INT4] = 4 };

/* Rows are prefetched about EB_PREFETCH_BYTES ahead into L2 (T1; 4-16 KB were alike; an L1
 * prefetch besides, at AVX-512 or AVX2, gained nothing in the benchmark's alternation). */
#define EB_PREFETCH_BYTES 8192
#define EB_MIN_PREFETCH_ROWS 16
#define EB_MAX_PREFETCH_ROWS 128
/* Tables up to this size stay in L2 once warm: prefetches there only cost issue slots. */
#define EB_PREFETCH_MIN_TABLE_BYTES (1 << 20)
/* Tables above this (half a 32 MB L3) are read mostly from DRAM, where blocks of at least
 * EB_RETRY_MIN_BLOCK_BYTES get a second L2 prefetch half as far ahead (Zen 4 drops some T1
 * prefetches; the retry catches most: bench/notes/results-2026-11.md). */
#define EB_RETRY_MIN_TABLE_BYTES (16 << 20)
#define EB_RETRY_MIN_BLOCK_BYTES 128

/* How a run's rows are read (copied to locals in the row loop: kept in registers). A row of at
 * most EB_BLOCK_COLUMNS is one block of `vectors`; a wider one `blocks` blocks of EB_BLOCK_VECTORS,
 * the last of them ending with the row. */
typedef struct {
    const uint8_t *data;            /* row 0 */
    const uint8_t *qparams;
    int64_t qparams_stride, rows, row_bytes;
    int64_t block_bytes;            /* bytes of a row in a block: prefetched */
    int64_t blocks;                 /* wide rows */
    int vectors;                    /* rows of one block */
    int64_t last_offset;            /* bytes from the block's start to its last vector (to the last block: wide) */
    int64_t last_column;            /* that vector's (block's) first output column */
    int last_lanes;                 /* columns of the row's last vector stored: VF_LANES, or fewer (narrow
                                     * rows, int4's pad nibble at odd D) */
    int64_t full_rows;              /* narrow rows: those that may be read a whole vector in place */
    const uint8_t *tail_rows;       /* narrow rows full_rows..R-1, padded */
    int64_t tail_row_bytes;         /* from one to the next there (0 where every row has one address) */
    const void *indices;
    const int64_t *offsets;
    const float *weights;
    int64_t first, last, prefetch_end, prefetch_rows, retry_rows;
    float *out;
    int64_t out_stride;
    int pooling, check;
} eb_plan;

SIMD_INLINE int64_t eb_index(const void *indices, const int index64, int64_t i)
{
    return index64 ? ((const int64_t *)indices)[i] : (int64_t)((const int32_t *)indices)[i];
}

/* Bytes of one vector of a dtype's values. */
#define EB_VECTOR_BYTES(dtype) (VF_LANES * eb_element_bits[dtype] / 8)

/* VF_LANES values at p as float32 (codes for int8/int4). */
SIMD_INLINE vf eb_load(const int dtype, const uint8_t *p)
{
    switch (dtype) {
    case EB_FP32: return vf_load((const float *)p);
    case EB_FP16: return vf_load_f16((const uint16_t *)p);
    case EB_BF16: return vf_load_bf16((const uint16_t *)p);
    case EB_INT8: return vf_load_u8(p);
    default: return vf_load_u4(p);   /* byte j holds columns 2j (low nibble) and 2j+1 (high nibble) */
    }
}

/* How a block of a row is read: one block of a row ending in its last vector, the one block of
 * rows narrower than a vector, or a block of EB_BLOCK_VECTORS of a wide row. */
enum { EB_ROW_BLOCK, EB_NARROW_BLOCK, EB_WIDE_BLOCK };

/* Row r of a block starting at `data` (of a narrow table's last rows, the padded copy). */
SIMD_INLINE const uint8_t *eb_block_row(const int kind, const eb_plan *p, const uint8_t *data, const int64_t r)
{
    if (kind == EB_NARROW_BLOCK && r >= p->full_rows)
        return p->tail_rows + (r - p->full_rows) * p->tail_row_bytes;
    return data + r * p->row_bytes;
}

/* Vector v of a block's row (one block's last vector ends with the row). */
SIMD_INLINE vf eb_row_vector(const int dtype, const int nv, const int kind, const eb_plan *p, const uint8_t *row,
                             const int v)
{
    if (kind == EB_ROW_BLOCK && v == nv - 1)
        return eb_load(dtype, row + p->last_offset);
    return eb_load(dtype, row + (int64_t)v * EB_VECTOR_BYTES(dtype));
}

/* L2 prefetch of every line that the block at `data` of row r touches: one per 64 bytes of
 * vectors, and the block's last byte when the row does not start a line, plus the row's qparams. */
SIMD_INLINE void eb_prefetch_row(const int dtype, const int nv, const eb_plan *p, const uint8_t *data, const int64_t r)
{
    const int vector_bytes = EB_VECTOR_BYTES(dtype);
    const uint8_t *row = data + r * p->row_bytes;
    for (int v = 0; v < nv; v++)
        if (v * vector_bytes % 64 == 0)
            simd_prefetch_l2(row + v * vector_bytes);
    if ((uintptr_t)row % 64)
        simd_prefetch_l2(row + p->block_bytes - 1);
    if (dtype == EB_INT8 || dtype == EB_INT4)
        simd_prefetch_l2(p->qparams + r * p->qparams_stride);
}

/* Prefetches the block of the row at index position i + ahead (a valid one, below prefetch_end). */
SIMD_INLINE void eb_prefetch_ahead(const int dtype, const int nv, const int index64, const eb_plan *p,
                                   const uint8_t *data, const int64_t i, const int64_t ahead)
{
    if (i + ahead < p->prefetch_end) {
        const int64_t r = eb_index(p->indices, index64, i + ahead);
        if ((uint64_t)r < (uint64_t)p->rows)
            eb_prefetch_row(dtype, nv, p, data, r);
    }
}

/* How a row joins the pooled row: add it, add it times (weight * scale) (weights or codes), or
 * take the maximum. */
enum { EB_ADD, EB_FMA, EB_TAKE_MAX };

/* Pools the block at `data` of the row at index position i into `acc` (its bias into *bias_sum; a
 * skipped index counts in *skipped); returns 1 when the index is bad (check set), else 0.
 * Prefetches the block of the rows that prefetch_rows and retry_rows positions ahead will read. */
SIMD_INLINE int eb_pool_position(const int dtype, const int nv, const int index64, const int how, const int kind,
                                 const eb_plan *p, const uint8_t *data, const int64_t i, vf *acc, float *bias_sum,
                                 int64_t *skipped)
{
    const int quantized = dtype == EB_INT8 || dtype == EB_INT4;
    eb_prefetch_ahead(dtype, nv, index64, p, data, i, p->prefetch_rows);
    if (p->retry_rows)
        eb_prefetch_ahead(dtype, nv, index64, p, data, i, p->retry_rows);
    const int64_t r = eb_index(p->indices, index64, i);
    if ((uint64_t)r >= (uint64_t)p->rows) {
        (*skipped)++;
        return p->check && r != -1;
    }
    const uint8_t *row = eb_block_row(kind, p, data, r);
    float qp[2] = { 1.0f, 0.0f };
    if (quantized)
        memcpy(qp, p->qparams + r * p->qparams_stride, 8);
    if (how == EB_TAKE_MAX) {
        const vf scale = vf_set1(qp[0]), bias = vf_set1(qp[1]);
        for (int v = 0; v < nv; v++) {
            vf x = eb_row_vector(dtype, nv, kind, p, row, v);
            if (quantized)
                x = vf_fmadd(x, scale, bias);
            acc[v] = vf_max(acc[v], x);
        }
    } else if (how == EB_FMA) {
        const float alpha = p->weights ? p->weights[i] : 1.0f;
        *bias_sum += alpha * qp[1];
        const vf a = vf_set1(alpha * qp[0]);
        for (int v = 0; v < nv; v++)
            acc[v] = vf_fmadd(eb_row_vector(dtype, nv, kind, p, row, v), a, acc[v]);
    } else {
        for (int v = 0; v < nv; v++)
            acc[v] = vf_add(eb_row_vector(dtype, nv, kind, p, row, v), acc[v]);
    }
    return 0;
}

/* Pools the block at `data` of bag s into `out`, its row's last vector (for a wide row, the one
 * ending at out + VF_LANES * nv) `last_lanes` columns only; returns the position of a bad index
 * (check set), else -1. Where two chains fit, even and odd positions go to separate accumulators,
 * summed at the end, so rows in cache are not bound by the add latency. */
SIMD_INLINE int64_t eb_pool_bag(const int dtype, const int nv, const int index64, const int how, const int kind,
                                const eb_plan *p, const uint8_t *data, const int64_t s, float *out, const int last_lanes)
{
    const int two_chains = nv <= EB_TWO_CHAIN_VECTORS, pooling = p->pooling;
    const int64_t start = p->offsets[s], end = p->offsets[s + 1];
    vf even[EB_BLOCK_VECTORS], odd[EB_BLOCK_VECTORS];
    float bias_sum = 0.0f;
    int64_t skipped = 0;
    const vf initial = vf_set1(pooling == EB_MAX ? -INFINITY : 0.0f);
    for (int v = 0; v < nv; v++)
        even[v] = odd[v] = initial;
    int64_t i = start;
    for (; i + 1 < end; i += 2) {
        if (eb_pool_position(dtype, nv, index64, how, kind, p, data, i, even, &bias_sum, &skipped))
            return i;
        if (eb_pool_position(dtype, nv, index64, how, kind, p, data, i + 1, two_chains ? odd : even, &bias_sum,
                             &skipped))
            return i + 1;
    }
    if (i < end && eb_pool_position(dtype, nv, index64, how, kind, p, data, i, even, &bias_sum, &skipped))
        return i;
    const int64_t count = end - start - skipped;
    const vf bias = vf_set1(bias_sum);
    const vf scale = vf_set1(count == 0 ? 0.0f : pooling == EB_MEAN ? 1.0f / (float)count : 1.0f);
    for (int v = 0; v < nv; v++) {
        vf pooled = even[v];
        if (two_chains)
            pooled = pooling == EB_MAX ? vf_max(pooled, odd[v]) : vf_add(pooled, odd[v]);
        if (pooling != EB_MAX)
            pooled = vf_mul(vf_add(pooled, bias), scale);
        if (count == 0)
            pooled = vf_zero();
        float *to = kind == EB_ROW_BLOCK && v == nv - 1 ? out + p->last_column : out + VF_LANES * v;
        if (v < nv - 1 || last_lanes == VF_LANES)
            vf_store(to, pooled);
        else
            vf_store_n(to, pooled, last_lanes);
    }
    return -1;
}

/* Pools the run's bags of rows of one block (`kind` EB_ROW_BLOCK or EB_NARROW_BLOCK); returns the
 * position of a bad index (check set), else -1. */
SIMD_INLINE int64_t eb_pool_rows(const int dtype, const int nv, const int index64, const int how, const int kind,
                                 const eb_plan *p)
{
    float *out = p->out;
    for (int64_t s = p->first; s < p->last; s++, out += p->out_stride) {
        const int64_t bad = eb_pool_bag(dtype, nv, index64, how, kind, p, p->data, s, out, p->last_lanes);
        if (bad >= 0)
            return bad;
    }
    return -1;
}

/* Pools the run's bags of wide rows, each one block after another; returns the position of a bad
 * index (check set), else -1. */
SIMD_INLINE int64_t eb_pool_wide_rows(const int dtype, const int index64, const int how, const eb_plan *p)
{
    float *out = p->out;
    for (int64_t s = p->first; s < p->last; s++, out += p->out_stride) {
        for (int64_t k = 0; k < p->blocks; k++) {
            const int last = k == p->blocks - 1;
            const int64_t column = last ? p->last_column : k * EB_BLOCK_COLUMNS;
            const uint8_t *data = last ? p->data + p->last_offset : p->data + p->block_bytes * k;
            const int64_t bad = eb_pool_bag(dtype, EB_BLOCK_VECTORS, index64, how, EB_WIDE_BLOCK, p, data, s,
                                            out + column, last ? p->last_lanes : VF_LANES);
            if (bad >= 0)
                return bad;
        }
    }
    return -1;
}

/* One bag loop per way of pooling and way of reading rows, reading the run's fields from a local
 * copy: the compiler keeps them in registers instead of reloading them for every row, and no row
 * branches on the pooling. nv = 0: wide rows. */
SIMD_INLINE int64_t eb_pool_how(const int dtype, const int nv, const int index64, const int how, const eb_plan *p)
{
    if (nv == 0)
        return eb_pool_wide_rows(dtype, index64, how, p);
    if (nv == 1 && p->full_rows < p->rows)   /* only narrow rows pay for this test a row */
        return eb_pool_rows(dtype, nv, index64, how, EB_NARROW_BLOCK, p);
    return eb_pool_rows(dtype, nv, index64, how, EB_ROW_BLOCK, p);
}
SIMD_INLINE int64_t eb_pool_plan(const int dtype, const int nv, const int index64, const eb_plan *plan)
{
    const eb_plan local = *plan;
    if (local.pooling == EB_MAX)
        return eb_pool_how(dtype, nv, index64, EB_TAKE_MAX, &local);
    if (local.weights || dtype == EB_INT8 || dtype == EB_INT4)
        return eb_pool_how(dtype, nv, index64, EB_FMA, &local);
    return eb_pool_how(dtype, nv, index64, EB_ADD, &local);
}

typedef int64_t (*eb_loop_fn)(const eb_plan *);

/* One function per (dtype, vectors of a one-block row or 0 for wide rows, index width), so each
 * inlined copy has constant loops. Plain C keeps the pooled row in memory whatever the loops'
 * bounds: there, the vectors of a one-block row are a run-time count (an eighth of the compile). */
#define EB_LOOP(D, V, I) \
    static int64_t SIMD_FN(eb_loop_##D##_##V##_##I)(const eb_plan *p) { return eb_pool_plan(D, V, I, p); }
#if SIMD_LEVEL == 0
#define EB_LOOPS_OF_DTYPE(D, I) \
    EB_LOOP(D, 0, I) \
    static int64_t SIMD_FN(eb_loop_##D##_n_##I)(const eb_plan *p) { return eb_pool_plan(D, p->vectors, I, p); }
#define EB_ROW_OF_LOOPS(D, I) \
    { SIMD_FN(eb_loop_##D##_0_##I), SIMD_FN(eb_loop_##D##_n_##I), SIMD_FN(eb_loop_##D##_n_##I), \
      SIMD_FN(eb_loop_##D##_n_##I), SIMD_FN(eb_loop_##D##_n_##I), SIMD_FN(eb_loop_##D##_n_##I), \
      SIMD_FN(eb_loop_##D##_n_##I), SIMD_FN(eb_loop_##D##_n_##I), SIMD_FN(eb_loop_##D##_n_##I) }
#else
#define EB_LOOPS_OF_DTYPE(D, I) \
    EB_LOOP(D, 0, I) EB_LOOP(D, 1, I) EB_LOOP(D, 2, I) EB_LOOP(D, 3, I) EB_LOOP(D, 4, I) \
    EB_LOOP(D, 5, I) EB_LOOP(D, 6, I) EB_LOOP(D, 7, I) EB_LOOP(D, 8, I)
#define EB_ROW_OF_LOOPS(D, I) \
    { SIMD_FN(eb_loop_##D##_0_##I), SIMD_FN(eb_loop_##D##_1_##I), SIMD_FN(eb_loop_##D##_2_##I), \
      SIMD_FN(eb_loop_##D##_3_##I), SIMD_FN(eb_loop_##D##_4_##I), SIMD_FN(eb_loop_##D##_5_##I), \
      SIMD_FN(eb_loop_##D##_6_##I), SIMD_FN(eb_loop_##D##_7_##I), SIMD_FN(eb_loop_##D##_8_##I) }
#endif
#define EB_LOOPS(I) \
    EB_LOOPS_OF_DTYPE(0, I) EB_LOOPS_OF_DTYPE(1, I) EB_LOOPS_OF_DTYPE(2, I) EB_LOOPS_OF_DTYPE(3, I) \
    EB_LOOPS_OF_DTYPE(4, I)
EB_LOOPS(0)
EB_LOOPS(1)
#define EB_TABLE_OF_LOOPS(I) \
    { EB_ROW_OF_LOOPS(0, I), EB_ROW_OF_LOOPS(1, I), EB_ROW_OF_LOOPS(2, I), EB_ROW_OF_LOOPS(3, I), \
      EB_ROW_OF_LOOPS(4, I) }

/* [index64][dtype][vectors of a one-block row, 0 for wide rows]; the lists above stop at 8. */
typedef char eb_block_vectors_must_be_8[EB_BLOCK_VECTORS == 8 ? 1 : -1];
static const eb_loop_fn SIMD_FN(eb_loops)[2][EB_DTYPES][EB_BLOCK_VECTORS + 1] = {
    EB_TABLE_OF_LOOPS(0), EB_TABLE_OF_LOOPS(1)
};

/* Pools a run (dim >= 1); returns the position of a bad index (check set), else -1. */
int64_t SIMD_FN(eb_pool_run)(const eb_run *run)
{
    const int bits = eb_element_bits[run->dtype];
    const int64_t dim = run->dim, table_bytes = run->rows * run->row_bytes;
    const int wide = dim > EB_BLOCK_COLUMNS;
    const int nv = wide ? 0 : (int)((dim + VF_LANES - 1) / VF_LANES);
    /* The row's last vector (block, for wide rows) ends with its bytes: for int4, with its last
     * byte, so with a pad nibble at odd D. */
    const int64_t padded_columns = run->dtype == EB_INT4 ? dim + (dim & 1) : dim;
    const int64_t last_width = wide ? EB_BLOCK_COLUMNS : VF_LANES;
    const int64_t last_first = padded_columns >= last_width ? padded_columns - last_width : 0;
    const int64_t block_bytes = ((wide ? EB_BLOCK_COLUMNS : dim) * bits + 7) / 8;
    /* rows are prefetched about EB_PREFETCH_BYTES ahead: as many rows as that holds of a block */
    int64_t prefetch_rows = EB_PREFETCH_BYTES / (block_bytes + (run->qparams ? 8 : 0));
    prefetch_rows = prefetch_rows < EB_MIN_PREFETCH_ROWS ? EB_MIN_PREFETCH_ROWS
                  : prefetch_rows > EB_MAX_PREFETCH_ROWS ? EB_MAX_PREFETCH_ROWS : prefetch_rows;
    eb_plan plan = {
        .data = run->data, .qparams = run->qparams, .qparams_stride = run->qparams_stride, .rows = run->rows,
        .row_bytes = run->row_bytes, .block_bytes = block_bytes,
        .blocks = wide ? (dim + EB_BLOCK_COLUMNS - 1) / EB_BLOCK_COLUMNS : 1, .vectors = nv,
        .last_offset = last_first * bits / 8, .last_column = last_first,
        .last_lanes = (int)(dim - last_first - (last_width - VF_LANES) < VF_LANES
                            ? dim - last_first - (last_width - VF_LANES) : VF_LANES),
        .full_rows = run->rows,
        .indices = run->indices, .offsets = run->offsets, .weights = run->weights,
        .first = run->first, .last = run->last,
        .prefetch_end = table_bytes <= EB_PREFETCH_MIN_TABLE_BYTES ? 0 : run->lookahead_end,
        .prefetch_rows = prefetch_rows,
        .retry_rows = table_bytes > EB_RETRY_MIN_TABLE_BYTES && block_bytes >= EB_RETRY_MIN_BLOCK_BYTES
                      ? prefetch_rows / 2 : 0,
        .out = run->out, .out_stride = run->out_stride, .pooling = run->pooling, .check = run->check,
    };
    uint8_t tail_copy[EB_TAIL_ROWS * VF_LANES * 4];
    if (padded_columns < VF_LANES) {
        /* Narrow rows, read a vector from their start: row r's read ends at r * row_bytes + vector
         * bytes, the table at (R-1) * row_bytes + its D values. Rows past full_rows (fewer than the
         * bytes read past a row's end) come from the padded copy; where every row has one address,
         * one copied row stands for all. */
        const int64_t vector_bytes = EB_VECTOR_BYTES(run->dtype);
        const int64_t limit = (run->rows - 1) * run->row_bytes + block_bytes - vector_bytes;
        plan.full_rows = limit < 0 ? 0 : run->row_bytes <= 0 ? run->rows
                       : limit / run->row_bytes + 1 < run->rows ? limit / run->row_bytes + 1 : run->rows;
        const int64_t copied = plan.full_rows == run->rows ? 0 : run->row_bytes > 0 ? run->rows - plan.full_rows : 1;
        plan.tail_rows = tail_copy;
        plan.tail_row_bytes = run->row_bytes > 0 ? vector_bytes : 0;
        memset(tail_copy, 0, (size_t)(copied * vector_bytes));
        for (int64_t k = 0; k < copied; k++)
            memcpy(tail_copy + k * vector_bytes, run->data + (plan.full_rows + k) * run->row_bytes,
                   (size_t)block_bytes);
    }
    return SIMD_FN(eb_loops)[run->index64][run->dtype][nv](&plan);
}

#endif
