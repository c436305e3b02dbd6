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

/* Row dtypes and pooling modes: the codes of recscore.kernels.embedding_bag.cpu. */
enum { EB_FP32 = 0, EB_FP16 = 1, EB_BF16 = 2, EB_INT8 = 3, EB_INT4 = 4, EB_DTYPES };
enum { EB_SUM = 0, EB_MEAN = 1, EB_MAX = 2 };
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

/* Register blocking per level: vectors of columns pooled in registers at a time (wider rows are
 * pooled one block of columns after another, bag by bag), and up to how many vectors the pooled
 * row is kept as two chains (both must fit beside a load and the scale). */
#if SIMD_LEVEL >= 2
#define EB_BLOCK_VECTORS 8          /* 128 columns: 16 of the 32 zmm for two chains */
#define EB_TWO_CHAIN_VECTORS 8
#elif SIMD_LEVEL == 1
#define EB_BLOCK_VECTORS 8          /* 64 columns; 16 ymm hold two chains of 6 vectors */
#define EB_TWO_CHAIN_VECTORS 6
#else
#define EB_BLOCK_VECTORS 8          /* plain C: the compiler keeps what its target's registers hold */
#define EB_TWO_CHAIN_VECTORS 4
#endif
#define EB_BLOCK_COLUMNS (VF_LANES * EB_BLOCK_VECTORS)
/* AVX-512 masks a row's last vector for free. Below it, the last vector is read in full: in place
 * where the table goes on after it, else from a padded copy of the last block of the table's last
 * rows (at most EB_TAIL_ROWS, as a vector is under 32 bytes), made once per run, so the row loop
 * has no masked load and no call. */
#define EB_MASKED_TAIL (SIMD_LEVEL >= 2)
#if !EB_MASKED_TAIL
#define EB_TAIL_ROWS 32
#define EB_TAIL_COPY_BYTES (EB_TAIL_ROWS * EB_BLOCK_VECTORS * VF_LANES * 4)
typedef char eb_tail_rows_hold_a_vector[VF_LANES * 4 <= EB_TAIL_ROWS ? 1 : -1];
#endif

static const int eb_element_bits[EB_DTYPES] = { 32, 16, 16, 8, 4 };

/* Rows are prefetched about EB_PREFETCH_BYTES ahead into L2 (T1; 4-16 KB were alike; an L1
 * prefetch besides, at AVX-512 or AVX2, gained nothing in the benchmark's alternation). */
#define EB_PREFETCH_BYTES 8192
#define EB_MIN_PREFETCH_ROWS 16
#define EB_MAX_PREFETCH_ROWS 128
/* Tables up to this size stay in L2 once warm: prefetches there only cost issue slots. */
#define EB_PREFETCH_MIN_TABLE_BYTES (1 << 20)
/* Tables above this (half the 32 MB L3 here) are read mostly from DRAM, where blocks of at least
 * EB_RETRY_MIN_BLOCK_BYTES get a second L2 prefetch half as far ahead (some T1 prefetches are
 * dropped on this EPYC; the retry catches most). */
#define EB_RETRY_MIN_TABLE_BYTES (16 << 20)
#define EB_RETRY_MIN_BLOCK_BYTES 128

/* A block of columns: where it starts in row 0, its bytes in a row, the second L2 prefetch's distance. */
typedef struct {
    const uint8_t *data;
    int64_t bytes, retry_rows;
} eb_columns;

/* A run as the row loop reads it (copied to locals: kept in registers). Rows are pooled in
 * full_blocks blocks of EB_BLOCK_COLUMNS columns, then a last block of 1..EB_BLOCK_COLUMNS. */
typedef struct {
    const uint8_t *qparams;
    int64_t qparams_stride, rows, row_bytes;
    eb_columns first_block, last_block;  /* full block k starts at first_block.data + k * first_block.bytes */
    int64_t full_blocks;
    int vectors, tail;              /* of the last block; columns in its last vector: 1..VF_LANES */
    int64_t full_rows;              /* rows whose last vector may be read in place (the table goes on past it) */
    const uint8_t *tail_rows;       /* rows full_rows.. of the last block, padded (not with EB_MASKED_TAIL) */
    int64_t tail_row_bytes;         /* from one to the next there (0 where every row has one address) */
    const void *indices;
    const int64_t *offsets;
    const float *weights;
    int64_t first, last, prefetch_end, prefetch_rows;
    float *out;
    int64_t out_stride;
    int pooling, check;
} eb_block;

SIMD_INLINE int64_t eb_index(const void *indices, const int index64, int64_t i)
{
    return index64 ? ((const int64_t *)indices)[i] : (int64_t)((const int32_t *)indices)[i];
}

/* Bytes of one vector of a dtype's values. */
#define EB_VECTOR_BYTES(dtype) (VF_LANES * eb_element_bits[dtype] / 8)

/* Columns VF_LANES*v.. of a row as float32 (codes for int8/int4). */
SIMD_INLINE vf eb_load(const int dtype, const uint8_t *row, const int v)
{
    const uint8_t *p = row + (int64_t)v * EB_VECTOR_BYTES(dtype);
    switch (dtype) {
    case EB_FP32: return vf_load((const float *)p);
    case EB_FP16: return vf_load_f16((const uint16_t *)p);
    case EB_BF16: return vf_load_bf16((const uint16_t *)p);
    case EB_INT8: return vf_load_u8(p);
    default: return vf_load_u4(p);   /* byte j holds columns 2j (low nibble) and 2j+1 (high nibble) */
    }
}

/* The first n columns of vector v, the other lanes 0; reads nothing past them. */
SIMD_INLINE vf eb_load_n(const int dtype, const uint8_t *row, const int v, const int n)
{
    const uint8_t *p = row + (int64_t)v * EB_VECTOR_BYTES(dtype);
    switch (dtype) {
    case EB_FP32: return vf_load_n((const float *)p, n);
    case EB_FP16: return vf_load_f16_n((const uint16_t *)p, n);
    case EB_BF16: return vf_load_bf16_n((const uint16_t *)p, n);
    case EB_INT8: return vf_load_u8_n(p, n);
    default: return vf_load_u4_n(p, n);
    }
}

/* Row r of a block of columns; in the last block, where its last vector can be read in full. */
SIMD_INLINE const uint8_t *eb_block_row(const int last_block, const eb_block *b, const eb_columns *c, const int64_t r)
{
    if (EB_MASKED_TAIL || !last_block || r < b->full_rows)
        return c->data + r * b->row_bytes;
    return b->tail_rows + (r - b->full_rows) * b->tail_row_bytes;
}

/* Vector v of a block's row. In the last block, the last vector is limited to `tail` columns with
 * AVX-512's mask; below it, read in full: its extra lanes hold other bytes of the table (or the
 * padding of the tail copy) and are never stored. */
SIMD_INLINE vf eb_row_vector(const int dtype, const int nv, const int last_block, const eb_block *b, const uint8_t *row,
                             const int v)
{
    if (EB_MASKED_TAIL && last_block && v == nv - 1)
        return eb_load_n(dtype, row, v, b->tail);   /* the mask is loop-invariant: computed once */
    return eb_load(dtype, row, v);
}

/* L2 prefetch of every line that a block of row r touches: one per 64 bytes of vectors, and the
 * block's last byte when the row does not start a line, plus the row's qparams. */
SIMD_INLINE void eb_prefetch_row(const int dtype, const int nv, const eb_block *b, const eb_columns *c, const int64_t r)
{
    const int vector_bytes = EB_VECTOR_BYTES(dtype);
    const uint8_t *row = c->data + r * b->row_bytes;
    for (int v = 0; v < nv; v++)
        if (v * vector_bytes % 64 == 0)
            simd_prefetch_l2(row + v * vector_bytes);
    if ((uintptr_t)row % 64)
        simd_prefetch_l2(row + c->bytes - 1);
    if (dtype == EB_INT8 || dtype == EB_INT4)
        simd_prefetch_l2(b->qparams + r * b->qparams_stride);
}

/* Prefetches the block of the row at index position i + ahead (a valid one, below prefetch_end). */
SIMD_INLINE void eb_prefetch_ahead(const int dtype, const int nv, const int index64, const eb_block *b,
                                   const eb_columns *c, const int64_t i, const int64_t ahead)
{
    if (i + ahead < b->prefetch_end) {
        const int64_t r = eb_index(b->indices, index64, i + ahead);
        if ((uint64_t)r < (uint64_t)b->rows)
            eb_prefetch_row(dtype, nv, b, c, r);
    }
}

/* How a row joins the pooled row: add it, add it times (weight * scale) (weights or codes), or
 * take the maximum. */
enum { EB_ADD, EB_FMA, EB_TAKE_MAX };

/* Pools a block of the row at index position i into `acc` (its bias into *bias_sum; a skipped
 * index counts in *skipped); returns 1 when the index is bad (check set), else 0. Prefetches the
 * block of the rows that prefetch_rows and retry_rows positions ahead will read. */
SIMD_INLINE int eb_pool_position(const int dtype, const int nv, const int index64, const int how, const int last_block,
                                 const eb_block *b, const eb_columns *c, const int64_t i,
                                 vf *acc, float *bias_sum, int64_t *skipped)
{
    const int quantized = dtype == EB_INT8 || dtype == EB_INT4;
    eb_prefetch_ahead(dtype, nv, index64, b, c, i, b->prefetch_rows);
    if (c->retry_rows)
        eb_prefetch_ahead(dtype, nv, index64, b, c, i, c->retry_rows);
    const int64_t r = eb_index(b->indices, index64, i);
    if ((uint64_t)r >= (uint64_t)b->rows) {
        (*skipped)++;
        return b->check && r != -1;
    }
    const uint8_t *row = eb_block_row(last_block, b, c, r);
    float qp[2] = { 1.0f, 0.0f };
    if (quantized)
        memcpy(qp, b->qparams + r * b->qparams_stride, 8);
    if (how == EB_TAKE_MAX) {
        const vf scale = vf_set1(qp[0]), bias = vf_set1(qp[1]);
        for (int v = 0; v < nv; v++) {
            vf x = eb_row_vector(dtype, nv, last_block, b, row, v);
            if (quantized)
                x = vf_fmadd(x, scale, bias);
            acc[v] = vf_max(acc[v], x);
        }
    } else if (how == EB_FMA) {
        const float alpha = b->weights ? b->weights[i] : 1.0f;
        *bias_sum += alpha * qp[1];
        const vf a = vf_set1(alpha * qp[0]);
        for (int v = 0; v < nv; v++)
            acc[v] = vf_fmadd(eb_row_vector(dtype, nv, last_block, b, row, v), a, acc[v]);
    } else {
        for (int v = 0; v < nv; v++)
            acc[v] = vf_add(eb_row_vector(dtype, nv, last_block, b, row, v), acc[v]);
    }
    return 0;
}

/* Pools a block of columns of bag s into out; returns the position of a bad index (check set),
 * else -1. Where two chains fit, even and odd positions go to separate accumulators, summed at the
 * end, so rows in cache are not bound by the add latency. */
SIMD_INLINE int64_t eb_pool_bag(const int dtype, const int nv, const int index64, const int how, const int last_block,
                                const eb_block *b, const eb_columns *c, const int64_t s,
                                float *out)
{
    const int two_chains = nv <= EB_TWO_CHAIN_VECTORS, pooling = b->pooling;
    const int64_t start = b->offsets[s], end = b->offsets[s + 1];
    vf even[EB_BLOCK_VECTORS], odd[EB_BLOCK_VECTORS];
    float bias_sum = 0.0f;
    int64_t skipped = 0;
    const vf initial = vf_set1(pooling == EB_MAX ? -INFINITY : 0.0f);
    for (int v = 0; v < nv; v++)
        even[v] = odd[v] = initial;
    int64_t i = start;
    for (; i + 1 < end; i += 2) {
        if (eb_pool_position(dtype, nv, index64, how, last_block, b, c, i, even, &bias_sum, &skipped))
            return i;
        if (eb_pool_position(dtype, nv, index64, how, last_block, b, c, i + 1, two_chains ? odd : even,
                             &bias_sum, &skipped))
            return i + 1;
    }
    if (i < end && eb_pool_position(dtype, nv, index64, how, last_block, b, c, i, even, &bias_sum, &skipped))
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
        if (last_block && v == nv - 1)
            vf_store_n(out + VF_LANES * v, pooled, b->tail);
        else
            vf_store(out + VF_LANES * v, pooled);
    }
    return -1;
}

/* Pools the run's bags, each one block of columns after another; returns the position of a bad
 * index (check set), else -1. */
SIMD_INLINE int64_t eb_pool_bags(const int dtype, const int nv, const int index64, const int how, const eb_block *b)
{
    float *out = b->out;
    for (int64_t s = b->first; s < b->last; s++, out += b->out_stride) {
        eb_columns full = b->first_block;
        for (int64_t k = 0; k < b->full_blocks; k++, full.data += full.bytes) {
            const int64_t bad = eb_pool_bag(dtype, EB_BLOCK_VECTORS, index64, how, 0, b, &full, s,
                                            out + k * EB_BLOCK_COLUMNS);
            if (bad >= 0)
                return bad;
        }
        const int64_t bad = eb_pool_bag(dtype, nv, index64, how, 1, b, &b->last_block, s,
                                        out + b->full_blocks * EB_BLOCK_COLUMNS);
        if (bad >= 0)
            return bad;
    }
    return -1;
}

/* One bag loop per way of pooling, reading the run's fields from a local copy: the compiler keeps
 * them in registers instead of reloading them for every row, and no row branches on the pooling. */
SIMD_INLINE int64_t eb_pool_block(const int dtype, const int nv, const int index64, const eb_block *block)
{
    const eb_block local = *block;
    if (local.pooling == EB_MAX)
        return eb_pool_bags(dtype, nv, index64, EB_TAKE_MAX, &local);
    if (local.weights || dtype == EB_INT8 || dtype == EB_INT4)
        return eb_pool_bags(dtype, nv, index64, EB_FMA, &local);
    return eb_pool_bags(dtype, nv, index64, EB_ADD, &local);
}

typedef int64_t (*eb_block_fn)(const eb_block *);

/* One function per (dtype, vectors of the last block, index width), so each inlined copy has
 * constant loops. Plain C keeps the pooled row in memory whatever the loops' bounds: there, one
 * function per (dtype, index width) with the vectors a run-time count (an eighth of the compile). */
#if SIMD_LEVEL == 0
#define EB_SPECIALISE_VECTORS(D, I) \
    static int64_t SIMD_FN(eb_block_##D##_##I)(const eb_block *b) { return eb_pool_block(D, b->vectors, I, b); }
#define EB_ROW_OF_VECTORS(D, I) \
    { SIMD_FN(eb_block_##D##_##I), SIMD_FN(eb_block_##D##_##I), SIMD_FN(eb_block_##D##_##I), \
      SIMD_FN(eb_block_##D##_##I), SIMD_FN(eb_block_##D##_##I), SIMD_FN(eb_block_##D##_##I), \
      SIMD_FN(eb_block_##D##_##I), SIMD_FN(eb_block_##D##_##I) }
#else
#define EB_SPECIALISE(D, V, I) \
    static int64_t SIMD_FN(eb_block_##D##_##V##_##I)(const eb_block *b) { return eb_pool_block(D, V, I, b); }
#define EB_SPECIALISE_VECTORS(D, I) \
    EB_SPECIALISE(D, 1, I) EB_SPECIALISE(D, 2, I) EB_SPECIALISE(D, 3, I) EB_SPECIALISE(D, 4, I) \
    EB_SPECIALISE(D, 5, I) EB_SPECIALISE(D, 6, I) EB_SPECIALISE(D, 7, I) EB_SPECIALISE(D, 8, I)
#define EB_ROW_OF_VECTORS(D, I) \
    { SIMD_FN(eb_block_##D##_1_##I), SIMD_FN(eb_block_##D##_2_##I), SIMD_FN(eb_block_##D##_3_##I), \
      SIMD_FN(eb_block_##D##_4_##I), SIMD_FN(eb_block_##D##_5_##I), SIMD_FN(eb_block_##D##_6_##I), \
      SIMD_FN(eb_block_##D##_7_##I), SIMD_FN(eb_block_##D##_8_##I) }
#endif
#define EB_SPECIALISE_DTYPES(I) \
    EB_SPECIALISE_VECTORS(0, I) EB_SPECIALISE_VECTORS(1, I) EB_SPECIALISE_VECTORS(2, I) \
    EB_SPECIALISE_VECTORS(3, I) EB_SPECIALISE_VECTORS(4, I)
EB_SPECIALISE_DTYPES(0)
EB_SPECIALISE_DTYPES(1)

#define EB_TABLE_OF_DTYPES(I) \
    { EB_ROW_OF_VECTORS(0, I), EB_ROW_OF_VECTORS(1, I), EB_ROW_OF_VECTORS(2, I), \
      EB_ROW_OF_VECTORS(3, I), EB_ROW_OF_VECTORS(4, I) }

/* [index64][dtype][vectors - 1]; the tables above list 8 vectors. */
typedef char eb_block_vectors_must_be_8[EB_BLOCK_VECTORS == 8 ? 1 : -1];
static const eb_block_fn SIMD_FN(eb_blocks)[2][EB_DTYPES][EB_BLOCK_VECTORS] = {
    EB_TABLE_OF_DTYPES(0), EB_TABLE_OF_DTYPES(1)
};

/* The columns c0..c0+columns-1 (c0 a multiple of EB_BLOCK_COLUMNS), their second L2 prefetch
 * `retry_rows` ahead when they are bytes enough. */
static eb_columns SIMD_FN(eb_columns_of)(const eb_run *run, int64_t c0, int64_t columns, int64_t retry_rows)
{
    const int bits = eb_element_bits[run->dtype];
    eb_columns c = { run->data + c0 * bits / 8, (columns * bits + 7) / 8, 0 };
    c.retry_rows = c.bytes >= EB_RETRY_MIN_BLOCK_BYTES ? retry_rows : 0;
    return c;
}

/* Pools a run (dim >= 1); returns the position of a bad index (check set), else -1. */
int64_t SIMD_FN(eb_pool_run)(const eb_run *run)
{
    const int bits = eb_element_bits[run->dtype];
    const int64_t dim = run->dim, table_bytes = run->rows * run->row_bytes;
    const int64_t full_blocks = (dim - 1) / EB_BLOCK_COLUMNS, last_c0 = full_blocks * EB_BLOCK_COLUMNS;
    const int64_t last_columns = dim - last_c0;
    const int nv = (int)((last_columns + VF_LANES - 1) / VF_LANES);
    /* rows are prefetched about EB_PREFETCH_BYTES ahead: as many rows as that holds of the first block */
    const int64_t first_block_bytes = ((full_blocks ? EB_BLOCK_COLUMNS : dim) * bits + 7) / 8;
    int64_t prefetch_rows = EB_PREFETCH_BYTES / (first_block_bytes + (run->qparams ? 8 : 0));
    prefetch_rows = prefetch_rows < EB_MIN_PREFETCH_ROWS ? EB_MIN_PREFETCH_ROWS
                  : prefetch_rows > EB_MAX_PREFETCH_ROWS ? EB_MAX_PREFETCH_ROWS : prefetch_rows;
    const int64_t retry_rows = table_bytes > EB_RETRY_MIN_TABLE_BYTES ? prefetch_rows / 2 : 0;
    eb_block b = {
        .qparams = run->qparams, .qparams_stride = run->qparams_stride, .rows = run->rows,
        .row_bytes = run->row_bytes,
        .first_block = SIMD_FN(eb_columns_of)(run, 0, EB_BLOCK_COLUMNS, retry_rows),
        .last_block = SIMD_FN(eb_columns_of)(run, last_c0, last_columns, retry_rows),
        .full_blocks = full_blocks, .vectors = nv, .tail = (int)(last_columns - (int64_t)VF_LANES * (nv - 1)),
        .indices = run->indices, .offsets = run->offsets, .weights = run->weights,
        .first = run->first, .last = run->last,
        .prefetch_end = table_bytes <= EB_PREFETCH_MIN_TABLE_BYTES ? 0 : run->lookahead_end,
        .prefetch_rows = prefetch_rows,
        .out = run->out, .out_stride = run->out_stride, .pooling = run->pooling, .check = run->check,
    };
    /* row r's last vector ends at r * row_bytes + read_end; the table at (R-1) * row_bytes + its D values */
    const int64_t read_end = last_c0 * bits / 8 + (int64_t)nv * EB_VECTOR_BYTES(run->dtype);
    const int64_t limit = (run->rows - 1) * run->row_bytes + (dim * bits + 7) / 8 - read_end;
    b.full_rows = limit < 0 ? 0 : run->row_bytes <= 0 ? run->rows   /* one address for every row (or R = 1) */
                : limit / run->row_bytes + 1 < run->rows ? limit / run->row_bytes + 1 : run->rows;
#if !EB_MASKED_TAIL
    uint8_t tail_copy[EB_TAIL_COPY_BYTES];
    /* Rows full_rows..R-1 of the last block (fewer than EB_TAIL_ROWS: that is more than the bytes
     * read past a row's end), or one row standing for all where every row has one address. */
    const int64_t span = (int64_t)nv * EB_VECTOR_BYTES(run->dtype);
    const int64_t copied = b.full_rows == run->rows ? 0 : run->row_bytes > 0 ? run->rows - b.full_rows : 1;
    b.tail_rows = tail_copy;
    b.tail_row_bytes = run->row_bytes > 0 ? span : 0;
    memset(tail_copy, 0, (size_t)(copied * span));
    for (int64_t k = 0; k < copied; k++)
        memcpy(tail_copy + k * span, b.last_block.data + (b.full_rows + k) * run->row_bytes, (size_t)b.last_block.bytes);
#endif
    return SIMD_FN(eb_blocks)[run->index64][run->dtype][nv - 1](&b);
}

#endif
