/* Pooled embedding-bag lookup over every table of a TableBatch in one OpenMP region: the driver.
 *
 * The row loops are in _embedding_bag_simd.h, compiled once per level; eb_lookup checks the level
 * it is asked for against the CPU and runs the best compiled one at or below it.
 *
 * Work: the bags of all tables form one table-major sequence of T*B segments, cut into chunks of
 * equal estimated cost (indices weighted by row bytes, plus a per-bag cost) handed out one at a
 * time (dynamic schedule), so skewed bag sizes and a thread slowed by other load still balance.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "_cpu.h"
#include "_embedding_bag_simd.h"

#define EB_CHUNKS_PER_THREAD 16
/* Calls of less estimated cost (eb_index_cost, eb_bag_cost: about bytes read) run on the calling
 * thread alone: waking a sleeping OpenMP thread and joining it cost 60-120 us here, about 3 MB of
 * rows on one thread (bench/notes/cpu-embedding.md). */
#define EB_PARALLEL_MIN_COST (3 << 20)

int64_t eb_pool_run_baseline(const eb_run *run);
int64_t eb_pool_run_avx2(const eb_run *run);
int64_t eb_pool_run_avx512(const eb_run *run);

typedef struct {
    const int64_t *tables;      /* (T, EB_FIELDS) */
    const void *indices;
    int index64;
    const int64_t *offsets;     /* T*B + 1, table-major */
    const float *weights;
    int64_t bags_per_table;
    int pooling, check;
    int level;                  /* RS_BASELINE .. RS_AVX512_VNNI */
    float *out;                 /* (B, out_stride) */
    int64_t out_stride;
} eb_call;

typedef int64_t (*eb_pool_fn)(const eb_run *);

/* The compiled level for `level` (VNNI buys nothing here: AVX-512 runs it). */
static eb_pool_fn eb_pool_at(int level)
{
    return level >= RS_AVX512 ? eb_pool_run_avx512 : level == RS_AVX2 ? eb_pool_run_avx2 : eb_pool_run_baseline;
}

/* A table of D = 0: nothing to pool, but indices are still checked. */
static int64_t eb_check_run(const eb_run *run)
{
    if (!run->check)
        return -1;
    for (int64_t i = run->offsets[run->first]; i < run->offsets[run->last]; i++) {
        const int64_t r = run->index64 ? ((const int64_t *)run->indices)[i] : ((const int32_t *)run->indices)[i];
        if ((uint64_t)r >= (uint64_t)run->rows && r != -1)
            return i;
    }
    return -1;
}

/* Segments first..last-1 (all of table t) of one chunk. */
static int64_t eb_table_run(const eb_call *call, eb_pool_fn pool, int64_t t, int64_t first, int64_t last,
                            int64_t chunk_end)
{
    const int64_t *table = call->tables + t * EB_FIELDS;
    const int64_t B = call->bags_per_table, table_end = call->offsets[(t + 1) * B];
    const int dtype = (int)table[EB_DTYPE];
    const eb_run run = {
        .data = (const uint8_t *)(intptr_t)table[EB_DATA],
        .qparams = dtype == EB_INT8 || dtype == EB_INT4 ? (const uint8_t *)(intptr_t)table[EB_QPARAMS] : NULL,
        .qparams_stride = table[EB_QPARAMS_STRIDE],
        .rows = table[EB_ROWS], .row_bytes = table[EB_ROW_BYTES], .dim = table[EB_DIM], .dtype = dtype,
        .indices = call->indices, .index64 = call->index64, .offsets = call->offsets, .weights = call->weights,
        .first = first, .last = last, .lookahead_end = table_end < chunk_end ? table_end : chunk_end,
        .out = call->out + (first - t * B) * call->out_stride + table[EB_COLUMN],
        .out_stride = call->out_stride, .pooling = call->pooling, .check = call->check,
    };
    return run.dim == 0 ? eb_check_run(&run) : pool(&run);
}

/* Estimated cost of a table's indices and bags: row bytes plus a line per index, output bytes
 * plus a line per bag. */
static double eb_index_cost(const int64_t *table) { return (double)(table[EB_ROW_BYTES] + 64); }
static double eb_bag_cost(const int64_t *table) { return (double)(4 * table[EB_DIM] + 64); }

/* Estimated cost of segments 0..s-1, from the cost of whole tables before s's table. */
static double eb_cost_before(const eb_call *call, const double *table_cost, int64_t s)
{
    const int64_t B = call->bags_per_table, t = s / B;
    if (t * B == s)
        return table_cost[t];
    const int64_t *table = call->tables + t * EB_FIELDS;
    return table_cost[t] + (double)(call->offsets[s] - call->offsets[t * B]) * eb_index_cost(table)
        + (double)(s - t * B) * eb_bag_cost(table);
}

/* Pools every bag of every table into call->out at call->level. Returns RS_OK, RS_ERR_LEVEL (a
 * level this CPU lacks: nothing runs) or RS_ERR_MEMORY; *bad is -1 or the position of an index out
 * of range (check set; not necessarily the first). */
static int eb_lookup(const eb_call *call, int64_t n_tables, int num_threads, int64_t *bad_position)
{
    const int64_t B = call->bags_per_table, n_segments = n_tables * B;
    *bad_position = -1;
    if (!rs_level_ok(call->level))
        return RS_ERR_LEVEL;
    if (n_segments == 0)
        return RS_OK;
    const eb_pool_fn pool = eb_pool_at(call->level);
    double *table_cost = malloc(sizeof(double) * (size_t)(n_tables + 1));
    if (table_cost == NULL)
        return RS_ERR_MEMORY;
    table_cost[0] = 0.0;
    for (int64_t t = 0; t < n_tables; t++) {
        const int64_t *table = call->tables + t * EB_FIELDS;
        table_cost[t + 1] = table_cost[t] + (double)B * eb_bag_cost(table)
            + (double)(call->offsets[(t + 1) * B] - call->offsets[t * B]) * eb_index_cost(table);
    }
    int64_t n_chunks = (int64_t)num_threads * EB_CHUNKS_PER_THREAD;
    if (num_threads <= 1 || table_cost[n_tables] < EB_PARALLEL_MIN_COST)
        n_chunks = 1;
    if (n_chunks > n_segments)
        n_chunks = n_segments;
    int64_t *chunk_starts = malloc(sizeof(int64_t) * (size_t)(n_chunks + 1));
    if (chunk_starts == NULL) {
        free(table_cost);
        return RS_ERR_MEMORY;
    }
    /* chunk c starts at the first segment whose cost prefix reaches c/n_chunks of the total */
    chunk_starts[0] = 0;
    chunk_starts[n_chunks] = n_segments;
    for (int64_t c = 1; c < n_chunks; c++) {
        const double goal = table_cost[n_tables] * (double)c / (double)n_chunks;
        int64_t low = chunk_starts[c - 1], high = n_segments;
        while (low < high) {
            const int64_t s = low + (high - low) / 2;
            if (eb_cost_before(call, table_cost, s) < goal)
                low = s + 1;
            else
                high = s;
        }
        chunk_starts[c] = low;
    }
    int64_t bad = -1;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (n_chunks > 1)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t seen;
        #pragma omp atomic read
        seen = bad;
        if (seen >= 0)
            continue;   /* a bad index was found: the call raises, the rest is not needed */
        const int64_t chunk_end = call->offsets[chunk_starts[c + 1]];
        for (int64_t first = chunk_starts[c]; first < chunk_starts[c + 1]; ) {
            const int64_t t = first / B;
            const int64_t last = (t + 1) * B < chunk_starts[c + 1] ? (t + 1) * B : chunk_starts[c + 1];
            const int64_t found = eb_table_run(call, pool, t, first, last, chunk_end);
            if (found >= 0) {
                #pragma omp atomic write
                bad = found;
                break;
            }
            first = last;
        }
    }
    free(chunk_starts);
    free(table_cost);
    *bad_position = bad;
    return RS_OK;
}
