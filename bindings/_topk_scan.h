/* Fused similarity top-k over a corpus: the driver. The vector kernels are in _topk_scan_simd.h,
 * compiled once per level; tks_topk checks the level it is asked for against the CPU and runs the
 * level's kernels.
 *
 * Work: the queries are prepared once per call (panels of the level's lane count, norms, the
 * int16-quantized queries of the int8 bound), the corpus is cut into tiles of about
 * TKS_TILE_BYTES of float32 rows (re-read from L2 by every block of query panels), and runs of
 * whole tiles (chunks) go to the OpenMP threads in turn; each thread keeps one running top-k per
 * query over all its chunks (a candidate below a threshold that k of its candidates beat cannot
 * be in the final top-k, whichever chunk it comes from). Exclusions arrive as the caller's CSR:
 * the threads first sort them by tile (a counting sort, each thread a share of the queries), then
 * each tile's become a bitmap. Last, in the same parallel region, each query's candidates from
 * every thread are cut to the best k, sorted, and decoded into the caller's outputs.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu.h"
#include "_topk_scan_simd.h"

#define TKS_TILE_BYTES (1 << 16)   /* float32 rows a tile */
#define TKS_CHUNKS_PER_THREAD 8    /* chunks of tiles a thread: a core slowed by other work takes fewer */
/* The status of a scan whose scores came out NaN or inf (beside _cpu.h's RS_OK ...). */
enum { TKS_ERR_NON_FINITE = 16 };

extern const tks_level tks_level_baseline, tks_level_avx2, tks_level_avx512, tks_level_avx512_vnni;

static const tks_level *tks_level_at(int level)
{
    return level >= RS_AVX512_VNNI ? &tks_level_avx512_vnni
         : level == RS_AVX512      ? &tks_level_avx512
         : level == RS_AVX2        ? &tks_level_avx2
                                   : &tks_level_baseline;
}

/* Corpus rows a tile at `level` for B queries of dim values over `kind` rows: whole register blocks
 * (panels) or groups (one query at a time). */
static int64_t tks_tile_rows(int level, int kind, int64_t B, int64_t dim)
{
    const tks_level *lv = tks_level_at(level);
    const int64_t unit = B < tks_rows_below(kind) ? lv->lanes : lv->block_rows;
    const int64_t rows = TKS_TILE_BYTES / (4 * (dim > 0 ? dim : 1)) / unit * unit;
    return rows > unit ? rows : unit;
}

/* keys[0 .. n) in decreasing order (distinct keys). */
static void tks_sort_descending(int64_t *keys, int64_t n)
{
    while (n > 16) {   /* quicksort, median of three; recurse into the smaller side */
        int64_t a = keys[0], b = keys[n / 2], c = keys[n - 1];
        int64_t pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = 0, j = n - 1;
        while (i <= j) {
            while (keys[i] > pivot)
                i++;
            while (keys[j] < pivot)
                j--;
            if (i <= j) {
                int64_t t = keys[i];
                keys[i++] = keys[j];
                keys[j--] = t;
            }
        }
        if (j + 1 < n - i) {
            tks_sort_descending(keys, j + 1);
            keys += i;
            n -= i;
        } else {
            tks_sort_descending(keys + i, n - i);
            n = j + 1;
        }
    }
    for (int64_t i = 1; i < n; i++) {
        int64_t v = keys[i], j = i;
        for (; j > 0 && keys[j - 1] < v; j--)
            keys[j] = keys[j - 1];
        keys[j] = v;
    }
}

/* The tile of row id (n_tiles for an id outside [0, n_rows)): id * (1 / tile_rows) in double,
 * corrected by one step (no integer division). */
static inline int64_t tks_tile_of(int64_t id, int64_t n_rows, int64_t tile_rows, int64_t n_tiles, double inv_tile)
{
    if ((uint64_t)id >= (uint64_t)n_rows)
        return n_tiles;
    int64_t t = (int64_t)((double)id * inv_tile);
    t -= t * tile_rows > id;
    t += (t + 1) * tile_rows <= id;
    return t;
}

/* Queries q0 .. q1 of the exclusion CSR counted (scatter == 0) or placed (scatter == 1) by tile:
 * at[t] is tile t's next free slot in entries; an entry is the bit of (row id - row0, q) in the
 * tile's bitmap, word (id - row0) * n_panels + q / lanes shifted left by 4, bit q % lanes below it. */
static void tks_bucket_queries(const int64_t *excl_ptr, const int64_t *excl_ids, int64_t q0, int64_t q1,
                               int64_t n_rows, int64_t tile_rows, int64_t n_tiles, int64_t n_panels, int64_t lanes,
                               int scatter, int64_t *at, uint64_t *entries)
{
    const double inv_tile = 1.0 / (double)tile_rows;
    for (int64_t q = q0; q < q1; q++) {
        const uint64_t bit = (uint64_t)(q % lanes), panel = (uint64_t)(q / lanes);
        for (int64_t e = excl_ptr[q]; e < excl_ptr[q + 1]; e++) {
            const int64_t id = excl_ids[e], t = tks_tile_of(id, n_rows, tile_rows, n_tiles, inv_tile);
            if (scatter)   /* (an id outside the rows goes past the last tile, never read) */
                entries[at[t]++] = t < n_tiles ? (((uint64_t)(id - t * tile_rows) * (uint64_t)n_panels + panel) << 4) | bit : 0;
            else
                at[t]++;
        }
    }
}

/* The query side of a call at `lanes` lanes: panels (n_panels, dim, lanes), per lane |q|^2, |q|
 * and sum of q (stats, 3 * n_panels * lanes), and each query's last vector (qtail, B * lanes). */
static void tks_prepare_queries(const float *queries, int64_t B, int64_t dim, int64_t lanes, float *qpanels,
                                float *stats, float *qtail)
{
    const int64_t n_panels = (B + lanes - 1) / lanes, width = n_panels * lanes, full = dim / lanes * lanes;
    memset(qpanels, 0, sizeof(float) * (size_t)(width * dim));
    memset(stats, 0, sizeof(float) * (size_t)(3 * width));
    for (int64_t q = 0; q < B; q++) {
        const float *query = queries + q * dim;
        float sq = 0.0f, sum = 0.0f;
        for (int64_t c = 0; c < dim; c++) {
            qpanels[((q / lanes) * dim + c) * lanes + q % lanes] = query[c];
            sq += query[c] * query[c];
            sum += query[c];
        }
        stats[q] = sq;
        stats[width + q] = sqrtf(sq);
        stats[2 * width + q] = sum;
        for (int64_t i = 0; i < lanes; i++) {
            const int64_t c = dim - lanes + i;
            qtail[q * lanes + i] = dim >= lanes && c >= full ? query[c] : 0.0f;
        }
    }
}

/* The int8 bound's queries: q16 (B, stride) = rint(q / scale[q]) zero padded, q16_tail (B, width)
 * each row's last `width` codes past its whole vectors of `width` (else 0), scale (B) and slack
 * (B, after scale) as tks_tile_codes uses them. */
static void tks_quantize_queries(const float *queries, int64_t B, int64_t dim, int64_t stride, int64_t width,
                                 int16_t *q16, int16_t *q16_tail, float *scale_slack)
{
    /* |q16| <= qmax keeps 255 * qmax * dim, the largest |codes . q16|, inside int32 */
    const double qmax = fmin(32767.0, floor(2147483647.0 / (255.0 * (double)(dim > 0 ? dim : 1))));
    const int64_t full = dim / width * width;
    memset(q16, 0, sizeof(int16_t) * (size_t)(B * stride));
    for (int64_t q = 0; q < B; q++) {
        const float *query = queries + q * dim;
        double amax = 0.0, abs_sum = 0.0, residual = 0.0;
        for (int64_t c = 0; c < dim; c++) {
            amax = fmax(amax, fabs((double)query[c]));
            abs_sum += fabs((double)query[c]);
        }
        const float step = (float)(amax / qmax);
        for (int64_t c = 0; c < dim && step > 0.0f; c++) {
            double code = fmin(qmax, fmax(-qmax, rint((double)query[c] / step)));
            q16[q * stride + c] = (int16_t)code;
            residual += fabs((double)query[c] - (double)step * code);
        }
        if (step == 0.0f)
            residual = abs_sum;
        for (int64_t i = 0; i < width; i++) {
            const int64_t c = dim - width + i;
            q16_tail[q * width + i] = dim >= width && c >= full ? q16[q * stride + c] : 0;
        }
        /* codes <= 255: |codes . (q - step * q16)| <= 255 * residual; the float dot it is compared
         * with is off by at most dim * 2**-24 * 255 * sum|q| (taken twice); 1e-5 more covers the float
         * roundings of the bound itself beyond the 2**-21 * |approx| in the kernel */
        scale_slack[q] = step;
        double slack = (255.0 * residual + 2.0 * (double)dim * 0x1p-24 * 255.0 * abs_sum) * (1.0 + 1e-5) + 1e-30;
        scale_slack[B + q] = nextafterf((float)slack, INFINITY);
    }
}

/* Query q's best k of the candidates every thread kept, best first, into scores/ids (k each);
 * unfilled slots id -1 and score -inf (+inf for l2). pool: room for every thread's cap keys. */
static void tks_merge_query(const tks_call *call, const tks_thread *threads, int team, int64_t q, int64_t *pool,
                            float *scores, int64_t *ids)
{
    const int64_t k = call->k;
    int64_t total = 0;
    for (int t = 0; t < team; t++) {
        memcpy(pool + total, threads[t].keys + q * call->cap, sizeof(int64_t) * (size_t)threads[t].counts[q]);
        total += threads[t].counts[q];
    }
    const int64_t m = total < k ? total : k;
    if (total > k)
        tks_keep_best(pool, total, k);
    tks_sort_descending(pool, m);
    const int negate = call->metric == TKS_L2;   /* l2 was scored as -distance */
    for (int64_t i = 0; i < m; i++) {
        const float score = tks_float(tks_order((int32_t)(pool[i] >> 32)));
        scores[i] = negate ? 0.0f - score : score;
        ids[i] = TKS_LOW32 - (pool[i] & TKS_LOW32);
    }
    for (int64_t i = m; i < k; i++) {
        scores[i] = negate ? INFINITY : -INFINITY;
        ids[i] = -1;
    }
}

/* The scan. rows: n_rows rows of float32 (kind FP32), uint16 bits (FP16/BF16), or codes (INT8: dim
 * bytes, INT4: (dim + 1) / 2 bytes a row, low nibble first) with scale, bias (n_rows) float32.
 * queries (B, dim), B >= 1. excl_ptr: NULL or the exclusion CSR as given: (B + 1) offsets into
 * excl_ids, query q's excluded ids (any order, repeats allowed) at excl_ptr[q] .. excl_ptr[q + 1]
 * (offsets validated by the caller; ids outside [0, n_rows) are ignored). int8_bound: the integer
 * pre-selection of int8 rows for B < tks_rows_below(TKS_INT8) (0 scores every group in float).
 * Out: scores (B, k) float32 and ids (B, k) int64, best first. n_rows < 2**32 (ids are 32 bits in
 * the keys). Returns RS_OK, RS_ERR_LEVEL (a level this CPU lacks: nothing runs), RS_ERR_MEMORY or
 * TKS_ERR_NON_FINITE (a score came out NaN or inf; outputs unset). */
/* th's buffers for a call, and its thresholds at the floor; 0 when out of memory. */
static int tks_thread_buffers(tks_thread *th, int kind, int64_t B, int team, int64_t cap, int64_t width,
                              int64_t tile_rows, int64_t dim, int64_t lanes)
{
    th->keys = malloc(sizeof(int64_t) * (size_t)(B * cap + team * cap));   /* and the merge's pool */
    th->counts = calloc((size_t)B, sizeof(int64_t));
    th->thr = malloc(sizeof(int64_t) * (size_t)B);
    th->thr_score = malloc(sizeof(float) * (size_t)width);
    th->widened = kind == TKS_FP32 ? NULL : malloc(sizeof(float) * (size_t)(tile_rows * dim + lanes));
    th->norms = malloc(sizeof(float) * (size_t)(tile_rows + lanes));
    if (th->keys == NULL || th->counts == NULL || th->thr == NULL || th->thr_score == NULL || th->norms == NULL
        || (kind != TKS_FP32 && th->widened == NULL))
        return 0;
    for (int64_t q = 0; q < B; q++) {
        th->thr[q] = TKS_FLOOR_KEY;
        th->thr_score[q] = -INFINITY;
    }
    for (int64_t q = B; q < width; q++)
        th->thr_score[q] = INFINITY;   /* padding lanes never pass */
    return 1;
}

/* Inside the parallel region, every thread: the exclusions sorted by tile (a counting sort, each
 * thread taking a share of the queries), tile t's bitmap entries at entries[tile_start[t] ..
 * tile_start[t + 1]); tile_at: (team + 1) * (n_tiles + 1) scratch. */
static void tks_sort_exclusions(const int64_t *excl_ptr, const int64_t *excl_ids, int64_t B, int64_t n_rows,
                                int64_t tile_rows, int64_t n_tiles, int64_t n_panels, int64_t lanes, int64_t *tile_at,
                                int64_t *tile_start, uint64_t *entries)
{
    const int slot = omp_get_thread_num(), team = omp_get_num_threads();
    const int64_t q0 = B * slot / team, q1 = B * (slot + 1) / team;
    int64_t *at = tile_at + slot * (n_tiles + 1);
    memset(at, 0, sizeof(int64_t) * (size_t)(n_tiles + 1));
    tks_bucket_queries(excl_ptr, excl_ids, q0, q1, n_rows, tile_rows, n_tiles, n_panels, lanes, 0, at, NULL);
    #pragma omp barrier
    #pragma omp single
    {   /* tile by tile, thread by thread: where each thread's entries of a tile go */
        int64_t start = 0;
        for (int64_t t = 0; t <= n_tiles; t++) {
            tile_start[t] = start;
            for (int th_index = 0; th_index < team; th_index++) {
                const int64_t count = tile_at[th_index * (n_tiles + 1) + t];
                tile_at[th_index * (n_tiles + 1) + t] = start;
                start += count;
            }
        }
    }
    tks_bucket_queries(excl_ptr, excl_ids, q0, q1, n_rows, tile_rows, n_tiles, n_panels, lanes, 1, at, entries);
    #pragma omp barrier
}

/* Scores one tile into th, its exclusions (entries != NULL) spread into the bitmap excl first; returns 1
 * when a score came out NaN or inf. */
static int tks_scan_tile(const tks_level *lv, const tks_call *call, tks_thread *th, int64_t tile, int64_t tile_rows,
                         const uint16_t *no_excl, uint16_t *excl, const uint64_t *entries, const int64_t *tile_start)
{
    const int64_t row0 = tile * tile_rows;
    const int64_t n = call->n_rows - row0 < tile_rows ? call->n_rows - row0 : tile_rows;
    const uint16_t *tile_excl = no_excl;
    if (entries != NULL && tile_start[tile + 1] > tile_start[tile]) {
        memset(excl, 0, sizeof(uint16_t) * (size_t)(n * call->n_panels));
        for (int64_t e = tile_start[tile]; e < tile_start[tile + 1]; e++)
            excl[entries[e] >> 4] |= (uint16_t)(1u << (entries[e] & 15));
        tile_excl = excl;
    }
    return lv->tile(call, th, row0, n, tile_excl);
}

static int tks_topk(int level, int kind, const void *rows, const float *scale, const float *bias, int64_t n_rows,
                    int64_t dim, const float *queries, int64_t B, int metric, int64_t k, const int64_t *excl_ptr,
                    const int64_t *excl_ids, int int8_bound, int num_threads, float *scores_out, int64_t *ids_out)
{
    if (!rs_level_ok(level))
        return RS_ERR_LEVEL;
    const tks_level *lv = tks_level_at(level);
    const int64_t lanes = lv->lanes, n_panels = (B + lanes - 1) / lanes, width = n_panels * lanes;
    const int64_t tile_rows = tks_tile_rows(level, kind, B, dim), n_tiles = (n_rows + tile_rows - 1) / tile_rows;
    const int64_t n_chunks = n_tiles < TKS_CHUNKS_PER_THREAD * num_threads ? n_tiles : TKS_CHUNKS_PER_THREAD * num_threads;
    const int64_t tiles_per_chunk = n_chunks > 0 ? (n_tiles + n_chunks - 1) / n_chunks : 0;
    const int64_t cap = 2 * k + 16;
    const int codes_bound = int8_bound && kind == TKS_INT8 && B < tks_rows_below(kind);
    const int64_t q16_stride = (dim + TKS_QUANT_ALIGN - 1) / TKS_QUANT_ALIGN * TKS_QUANT_ALIGN + TKS_QUANT_ALIGN;
    float *qpanels = malloc(sizeof(float) * (size_t)(width * dim + lanes));
    float *qstats = malloc(sizeof(float) * (size_t)(3 * width + B * lanes));   /* |q|^2, |q|, sum of q; qtail */
    int16_t *q16 = codes_bound ? malloc(sizeof(int16_t) * (size_t)(B * (q16_stride + 2 * lanes))) : NULL;
    float *q16_scale = codes_bound ? malloc(sizeof(float) * (size_t)(2 * B)) : NULL;
    /* exclusions sorted by tile (a counting sort, the threads taking a share of the queries each):
     * tile t's bitmap entries at excl_entries[tile_start[t] .. tile_start[t + 1]) */
    const int64_t n_excl = excl_ptr == NULL ? 0 : excl_ptr[B] - excl_ptr[0];
    uint64_t *excl_entries = excl_ptr == NULL ? NULL : malloc(sizeof(uint64_t) * (size_t)(n_excl + 1));
    int64_t *tile_at = excl_ptr == NULL ? NULL : malloc(sizeof(int64_t) * (size_t)((num_threads + 1) * (n_tiles + 1)));
    int64_t *tile_start = tile_at == NULL ? NULL : tile_at + num_threads * (n_tiles + 1);
    tks_thread *threads = calloc((size_t)num_threads, sizeof(tks_thread));
    uint16_t *no_excl = calloc((size_t)(tile_rows * n_panels), sizeof(uint16_t));   /* the bitmap of a tile without exclusions */
    int failed = qpanels == NULL || qstats == NULL || threads == NULL || no_excl == NULL
                 || (codes_bound && (q16 == NULL || q16_scale == NULL))
                 || (excl_ptr != NULL && (excl_entries == NULL || tile_at == NULL));
    int non_finite = 0;
    tks_call call = {kind, metric, rows, scale, bias, n_rows, dim, B, k, cap, n_panels, queries, qpanels,
                     qstats, qstats + width, qstats + 2 * width, qstats + 3 * width,
                     (uint16_t)(B % lanes ? (1u << (B % lanes)) - 1 : (1u << lanes) - 1),
                     int8_bound, q16_stride, q16, q16 == NULL ? NULL : q16 + B * q16_stride,
                     q16_scale, q16_scale == NULL ? NULL : q16_scale + B};
    if (!failed) {
        tks_prepare_queries(queries, B, dim, lanes, qpanels, qstats, qstats + 3 * width);
        if (codes_bound)
            tks_quantize_queries(queries, B, dim, q16_stride, 2 * lanes, q16, q16 + B * q16_stride, q16_scale);
    }
    #pragma omp parallel num_threads(num_threads) if (!failed && n_chunks > 1 && num_threads > 1)
    {
        const int slot = omp_get_thread_num(), team = omp_get_num_threads();
        tks_thread *th = threads == NULL ? NULL : threads + slot;
        int ready = !failed && tks_thread_buffers(th, kind, B, team, cap, width, tile_rows, dim, lanes);
        uint16_t *excl = excl_ptr == NULL || !ready ? NULL : malloc(sizeof(uint16_t) * (size_t)(tile_rows * n_panels));
        if (!ready || (excl_ptr != NULL && excl == NULL)) {
            ready = 0;
            #pragma omp atomic write
            failed = 1;
        }
        if (excl_ptr != NULL && tile_at != NULL && excl_entries != NULL)   /* the same for every thread */
            tks_sort_exclusions(excl_ptr, excl_ids, B, n_rows, tile_rows, n_tiles, n_panels, lanes, tile_at, tile_start,
                                excl_entries);
        /* every thread meets the worksharing loops; one without its buffers skips its chunks */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t chunk = 0; chunk < n_chunks; chunk++) {
            if (!ready)
                continue;
            const int64_t tile_end = (chunk + 1) * tiles_per_chunk < n_tiles ? (chunk + 1) * tiles_per_chunk : n_tiles;
            for (int64_t tile = chunk * tiles_per_chunk; tile < tile_end; tile++)
                if (tks_scan_tile(lv, &call, th, tile, tile_rows, no_excl, excl,
                                  excl_ptr == NULL ? NULL : excl_entries, tile_start)) {
                    #pragma omp atomic write
                    non_finite = 1;
                }
        }
        if (!failed && !non_finite) {   /* the same for every thread: read after the loop's barrier */
            #pragma omp for schedule(dynamic, 4) nowait
            for (int64_t q = 0; q < B; q++)
                tks_merge_query(&call, threads, team, q, th->keys + B * cap, scores_out + q * k, ids_out + q * k);
        }
        free(excl);
    }
    if (threads != NULL)
        for (int t = 0; t < num_threads; t++) {
            free(threads[t].keys);
            free(threads[t].counts);
            free(threads[t].thr);
            free(threads[t].thr_score);
            free(threads[t].widened);
            free(threads[t].norms);
        }
    free(threads);
    free(no_excl);
    free(qpanels);
    free(qstats);
    free(q16);
    free(q16_scale);
    free(excl_entries);
    free(tile_at);
    return failed ? RS_ERR_MEMORY : non_finite ? TKS_ERR_NON_FINITE : RS_OK;
}
