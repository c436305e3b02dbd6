/* Self-attention of packed texts (the text encoder's), written once against _simd.h and compiled at
 * baseline, AVX2 and AVX-512 (setup.py; driver: _attention.h).
 *
 * A text s is rows starts[s] .. starts[s + 1] of qkv (T, 3 dim: queries, keys, values, biases not yet
 * added). Per text: its rows copied once into per-head buffers (keys transposed and zero-padded); per
 * head: scores of AT_ROWS queries at once along VF_LANES keys (each key vector loaded once for AT_ROWS
 * rows), the softmax with each row's own max, then P @ V along the head's columns. The key bias is never added:
 * q . b_k is one constant per query row, which the softmax cancels; the value bias is added once at the
 * end (the weights sum to 1).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_simd.h"
#include "_attention.h"

#define AT_ROWS (VF_LANES == 16 ? 4 : 2)   /* query rows a pass: their accumulators stay in registers */
#define AT_MAX_HD 64                        /* fixed-size arrays (no VLA), so they can live in registers */

/* exp(x) for x <= 0, ~1 ulp: Cephes expf's range reduction and polynomial, 2**n from its exponent bits
 * (below -87, exp(-87)). */
SIMD_INLINE vf at_exp_nonpositive(vf x)
{
    x = vf_max(x, vf_set1(-87.0f));
    const vi n = vf_to_vi(vf_mul(x, vf_set1(1.44269504f)));   /* round to nearest: |r| <= ln 2 / 2 */
    const vf nf = vi_to_vf(n);
    const vf r = vf_fnmadd(nf, vf_set1(-2.12194440e-4f), vf_fnmadd(nf, vf_set1(0.693359375f), x));
    vf p = vf_set1(1.9875691500e-4f);
    p = vf_fmadd(p, r, vf_set1(1.3981999507e-3f));
    p = vf_fmadd(p, r, vf_set1(8.3334519073e-3f));
    p = vf_fmadd(p, r, vf_set1(4.1665795894e-2f));
    p = vf_fmadd(p, r, vf_set1(1.6666665459e-1f));
    p = vf_fmadd(p, r, vf_set1(5.0000001201e-1f));
    const vf e = vf_add(vf_fmadd(vf_mul(p, r), r, r), vf_set1(1.0f));
    return vf_mul(e, vi_as_vf(vi_slli(vi_add(n, vi_set1(127)), 23)));
}

/* One head of one text: queries (L x HD, biased and scaled), keys_t (HD x Lp, zero past L), values
 * (L x HD, without the bias) -> out rows (stride dim) = softmax(Q K^T) V + v_bias. weights: AT_ROWS x Lp. */
SIMD_INLINE void at_head(const int HD, const float *queries, const float *keys_t, const float *values, int64_t L,
                         const float *v_bias, float *weights, float *out, int64_t dim)
{
    const int64_t Lp = (L + VF_LANES - 1) / VF_LANES * VF_LANES;
    for (int64_t i0 = 0; i0 < L; i0 += AT_ROWS) {
        const int R = L - i0 < AT_ROWS ? (int)(L - i0) : AT_ROWS;
        const float *q[AT_ROWS];
        for (int r = 0; r < AT_ROWS; r++)   /* rows past L repeat the last: computed, never stored */
            q[r] = queries + (i0 + (r < R ? r : R - 1)) * HD;
        for (int64_t jb = 0; jb < Lp; jb += VF_LANES) {
            vf acc[AT_ROWS];
            for (int r = 0; r < AT_ROWS; r++)
                acc[r] = vf_zero();
            for (int d = 0; d < HD; d++) {
                const vf k = vf_load(keys_t + d * Lp + jb);
                for (int r = 0; r < AT_ROWS; r++)
                    acc[r] = vf_fmadd(vf_set1(q[r][d]), k, acc[r]);
            }
            for (int r = 0; r < AT_ROWS; r++)
                vf_store(weights + r * Lp + jb, acc[r]);
        }
        float inverse[AT_ROWS];
        for (int r = 0; r < AT_ROWS; r++) {
            float *w = weights + r * Lp;
            vf top = vf_set1(-INFINITY);
            for (int64_t jb = 0; jb < Lp; jb += VF_LANES)   /* padding lanes (keys past L) left out */
                top = vf_max(top, vf_select(vmask_first((int)(L - jb)), vf_load(w + jb), vf_set1(-INFINITY)));
            const vf shift = vf_set1(vf_reduce_max(top));
            vf total = vf_zero();
            for (int64_t jb = 0; jb < Lp; jb += VF_LANES) {
                const vf e = vf_select(vmask_first((int)(L - jb)), at_exp_nonpositive(vf_sub(vf_load(w + jb), shift)),
                                       vf_zero());
                vf_store(w + jb, e);
                total = vf_add(total, e);
            }
            inverse[r] = 1.0f / vf_reduce_add(total);
        }
        vf context[AT_ROWS][AT_MAX_HD / VF_LANES];
        for (int r = 0; r < AT_ROWS; r++)
            for (int c = 0; c < HD / VF_LANES; c++)
                context[r][c] = vf_zero();
        for (int64_t j = 0; j < L; j++) {
            vf v[AT_MAX_HD / VF_LANES];
            for (int c = 0; c < HD / VF_LANES; c++)
                v[c] = vf_load(values + j * HD + c * VF_LANES);
            for (int r = 0; r < AT_ROWS; r++) {
                const vf p = vf_set1(weights[r * Lp + j]);
                for (int c = 0; c < HD / VF_LANES; c++)
                    context[r][c] = vf_fmadd(p, v[c], context[r][c]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int c = 0; c < HD / VF_LANES; c++)
                vf_store(out + (i0 + r) * dim + c * VF_LANES,
                         vf_fmadd(context[r][c], vf_set1(inverse[r]), vf_load(v_bias + c * VF_LANES)));
    }
}

/* Every head of the text at rows start .. start + L of qkv (row stride 3 dim). The text's rows are read
 * once, in order, into per-head buffers (buffer: 3 dim Lp floats): strided reads of one head's columns
 * across rows 4.6 kB apart waited on memory and the TLB. weights: AT_ROWS x Lp floats. */
SIMD_INLINE void at_text(const int HD, const float *qkv, const float *bias, int64_t start, int64_t L, int64_t n_head,
                         float *buffer, float *weights, float *out)
{
    const int64_t dim = n_head * HD, stride = 3 * dim, Lp = (L + VF_LANES - 1) / VF_LANES * VF_LANES;
    float *keys_t = buffer, *queries = buffer + dim * Lp, *values = queries + dim * Lp;
    const float scale = 1.0f / sqrtf((float)HD);
    for (int64_t j = 0; j < L; j++) {
        const float *row = qkv + (start + j) * stride;
        for (int64_t h = 0; h < n_head; h++)
            for (int d = 0; d < HD; d++) {
                queries[(h * L + j) * HD + d] = (row[h * HD + d] + bias[h * HD + d]) * scale;
                values[(h * L + j) * HD + d] = row[2 * dim + h * HD + d];
            }
    }
    /* keys column by column: the stores run in order, the strided loads meet the same few lines (in L1) */
    for (int64_t hd = 0; hd < dim; hd++) {
        const float *column = qkv + start * stride + dim + hd;
        for (int64_t j = 0; j < L; j++)
            keys_t[hd * Lp + j] = column[j * stride];
        for (int64_t j = L; j < Lp; j++)
            keys_t[hd * Lp + j] = 0.0f;
    }
    for (int64_t h = 0; h < n_head; h++)
        at_head(HD, queries + h * L * HD, keys_t + h * HD * Lp, values + h * L * HD, L, bias + 2 * dim + h * HD,
                weights, out + start * dim + h * HD, dim);
}

/* Texts first .. last - 1; head_dim 32 or 64. buffer: 3 dim Lp + AT_ROWS Lp floats for the longest
 * text's Lp. */
void SIMD_FN(at_texts)(const float *qkv, const float *bias, const int64_t *starts, int64_t n_head, int64_t head_dim,
                       int64_t first, int64_t last, float *buffer, float *out)
{
    for (int64_t s = first; s < last; s++) {
        const int64_t L = starts[s + 1] - starts[s], Lp = (L + VF_LANES - 1) / VF_LANES * VF_LANES;
        float *weights = buffer + 3 * n_head * head_dim * Lp;
        if (head_dim == 32)
            at_text(32, qkv, bias, starts[s], L, n_head, buffer, weights, out);
        else
            at_text(64, qkv, bias, starts[s], L, n_head, buffer, weights, out);
    }
}

int SIMD_FN(at_rows)(void) { return AT_ROWS; }
