/* Attention over the paged KV cache for the rows of an engine step, each row over its own list of cache slots (a
 * decode token over its sequence, a prefill row at position p over positions 0..p): no padding, no mask, so a row's
 * result does not depend on the other rows of its step. Called by cg_decode_layer (cpu_gemm.c) and through ctypes
 * (kernels/cpu_gemm.py `DecodeAttention`), which checks every shape and index first. */
#include "cpu_kernels.h"

/* each query head of each row against that row's own positions only, so a row's result does not depend on the
 * other rows of the batch (no padding, no mask). A unit of work is one row and one KV head with the query heads
 * that share it (GQA), so each block of keys is read from memory once for all of them.
 *
 * The arithmetic of every (row, head) is fixed, whatever the other rows, heads or lengths (d a multiple of 8; other
 * head dims take the scalar path of `attend_scalar`, just as fixed):
 *   score[l] = hsum8(sum over c-chunks of q[c:c+8] * k_l[c:c+8], fma in chunk order) * scale  (hsum8: fixed tree)
 *   p[l] = exp8(score[l] - max), sum = tree-sum of 8 lane sums (lane = l mod 8, l ascending)
 *   out[c] = (sum over l ascending of p[l] v_l[c], fma) * (1 / sum)
 * Keys go in blocks of 8 (their sums reduced together: 9 shuffles for 8 scores instead of 8 x 5) and values in
 * blocks of KB rows (read once per block for every head of the group). */
#define KB 64
#define RT 16  /* rows per attention tile (measured: 1.1-1.4x faster than 8, no better at 32) */

/* per pool thread: the scores of a tile; per caller: the tiles */
static _Thread_local buffer attn_buf, tiles_buf;

/* 8 accumulators -> one vector of their horizontal sums, each the same tree ((0+1)+(2+3))+((4+5)+(6+7)) */
static inline __m256 hsum8x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                             __m256 a7) {
    __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    /* u0 = [s0 s1 s2 s3 | s0' s1' s2' s3'] (low and high halves of a0..a3), likewise u1 for a4..a7 */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* scores of one query head q[d] against 8 keys (rows kr[0..7] of d floats), scaled */
static inline __m256 scores8(const float *q, const float *const kr[8], int64_t d, __m256 scale) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t c = 0; c < d; c += 8) {
        __m256 qv = _mm256_loadu_ps(q + c);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[0] + c), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[1] + c), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[2] + c), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[3] + c), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[4] + c), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[5] + c), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[6] + c), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[7] + c), a7);
    }
    return _mm256_mul_ps(hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7), scale);
}

/* out[0:8w] += sum over the block's keys of p[l] v_l[c0:c0+8w], l ascending (w vectors of 8 in registers) */
static inline __attribute__((always_inline)) void pv_block(const float *p, const float *const *vr, int64_t nl,
                                                           int64_t c0, int w, float *o) {
    __m256 acc[8];
    for (int i = 0; i < w; i++) acc[i] = _mm256_loadu_ps(o + c0 + 8 * i);
    for (int64_t l = 0; l < nl; l++) {
        __m256 pl = _mm256_broadcast_ss(p + l);
        for (int i = 0; i < w; i++) acc[i] = _mm256_fmadd_ps(pl, _mm256_loadu_ps(vr[l] + c0 + 8 * i), acc[i]);
    }
    for (int i = 0; i < w; i++) _mm256_storeu_ps(o + c0 + 8 * i, acc[i]);
}

typedef struct {
    const float *q;        /* [nd, heads, d], row stride ldq */
    int64_t ldq;
    const float *kc, *vc;  /* [slots, kv_heads, d] */
    const int64_t *idx;    /* [nd, ld_idx]: the cache slot of each position of each row */
    int64_t ld_idx;
    const int64_t *lens;   /* [nd] */
    int64_t nd, heads, kv_heads, d, longest;
    float scale;
    float *out;            /* [nd, heads * d] */
    const int64_t *tiles;  /* [ntiles + 1]: tile t is rows [tiles[t], tiles[t + 1]), which share one slot list */
    int64_t ntiles;
} attn_job;

static int64_t attn_stride(const attn_job *j) { return (j->longest + 7) / 8 * 8; }

/* The rows [r0, r0 + nr) (one slot list: the rows of one prefill chunk, or a decode row alone) with the query heads
 * of KV head g, d a multiple of 8. Each block of 8 keys and of KB values is read once for every row and head of the
 * tile (from the L1 cache), not once per row from further out. p: nr * group * (stride + 1) floats. */
static void attend_vec(const attn_job *j, int64_t r0, int64_t nr, int64_t g, float *p) {
    const int64_t group = j->heads / j->kv_heads, d = j->d, stride = attn_stride(j), units = nr * group;
    const int64_t *slots = j->idx + r0 * j->ld_idx;
    const __m256 scale = _mm256_set1_ps(j->scale), minf = _mm256_set1_ps(-INFINITY);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t lmax = 0;
    for (int64_t i = 0; i < nr; i++) lmax = j->lens[r0 + i] > lmax ? j->lens[r0 + i] : lmax;
    const float *kr[8];
    for (int64_t l0 = 0; l0 < lmax; l0 += 8) {
        for (int i = 0; i < 8; i++) kr[i] = j->kc + (slots[l0 + i < lmax ? l0 + i : lmax - 1] * j->kv_heads + g) * d;
        for (int64_t i = 0; i < nr; i++) {
            const int64_t len = j->lens[r0 + i];
            if (l0 >= len) continue;
            /* a row's lanes past its end score -inf: they add nothing to its max or sum */
            const __m256 in = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(len - l0)), lane));
            const float *q = j->q + (r0 + i) * j->ldq + g * group * d;
            for (int64_t h = 0; h < group; h++)
                _mm256_storeu_ps(p + (i * group + h) * stride + l0,
                                 _mm256_blendv_ps(minf, scores8(q + h * d, kr, d, scale), in));
        }
    }
    float *inv = p + units * stride;
    for (int64_t u = 0; u < units; u++) {
        const int64_t len = j->lens[r0 + u / group];
        float *ph = p + u * stride;
        __m256 mx = _mm256_loadu_ps(ph);
        for (int64_t l0 = 8; l0 < len; l0 += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(ph + l0));
        mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
        mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4e));
        mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xb1));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t l0 = 0; l0 < len; l0 += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ph + l0), mx));  /* exp8(-inf) = 0 */
            _mm256_storeu_ps(ph + l0, e);
            sum = _mm256_add_ps(sum, e);
        }
        __m256 z = _mm256_setzero_ps();
        inv[u] = 1.0f / _mm256_cvtss_f32(hsum8x8(sum, z, z, z, z, z, z, z));
    }
    for (int64_t i = 0; i < nr; i++) {
        float *o = j->out + (r0 + i) * j->heads * d + g * group * d;
        for (int64_t c = 0; c < group * d; c++) o[c] = 0.0f;
    }
    const float *vr[KB];
    for (int64_t l0 = 0; l0 < lmax; l0 += KB) {
        for (int64_t l = 0; l < KB && l0 + l < lmax; l++) vr[l] = j->vc + (slots[l0 + l] * j->kv_heads + g) * d;
        for (int64_t u = 0; u < units; u++) {
            const int64_t len = j->lens[r0 + u / group], nl = len - l0 < KB ? len - l0 : KB;
            if (nl <= 0) continue;
            const float *pu = p + u * stride + l0;
            float *o = j->out + (r0 + u / group) * j->heads * d + (g * group + u % group) * d;
            for (int64_t c0 = 0; c0 < d; c0 += 64) {
                switch (d - c0 >= 64 ? 8 : (int)((d - c0) / 8)) {  /* constant widths: accumulators in registers */
                    case 8: pv_block(pu, vr, nl, c0, 8, o); break;
                    case 7: pv_block(pu, vr, nl, c0, 7, o); break;
                    case 6: pv_block(pu, vr, nl, c0, 6, o); break;
                    case 5: pv_block(pu, vr, nl, c0, 5, o); break;
                    case 4: pv_block(pu, vr, nl, c0, 4, o); break;
                    case 3: pv_block(pu, vr, nl, c0, 3, o); break;
                    case 2: pv_block(pu, vr, nl, c0, 2, o); break;
                    default: pv_block(pu, vr, nl, c0, 1, o); break;
                }
            }
        }
    }
    for (int64_t u = 0; u < units; u++) {
        float *o = j->out + (r0 + u / group) * j->heads * d + (g * group + u % group) * d;
        const __m256 s = _mm256_set1_ps(inv[u]);
        for (int64_t c = 0; c < d; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), s));
    }
}

/* the same for a head dim that is not a multiple of 8: plain C, one head at a time, as fixed */
static void attend_scalar(const attn_job *j, int64_t r, int64_t g, float *p) {
    const int64_t group = j->heads / j->kv_heads, d = j->d, len = j->lens[r];
    const int64_t *slots = j->idx + r * j->ld_idx;
    for (int64_t h = g * group; h < (g + 1) * group; h++) {
        const float *q = j->q + r * j->ldq + h * d;
        float mx = -INFINITY;
        for (int64_t l = 0; l < len; l++) {
            const float *k = j->kc + (slots[l] * j->kv_heads + g) * d;
            float s = 0.0f;
            for (int64_t c = 0; c < d; c++) s += q[c] * k[c];
            p[l] = s * j->scale;
            mx = p[l] > mx ? p[l] : mx;
        }
        float sum = 0.0f;
        for (int64_t l = 0; l < len; l++) {
            p[l] = expf(p[l] - mx);
            sum += p[l];
        }
        float *o = j->out + r * j->heads * d + h * d;
        for (int64_t c = 0; c < d; c++) o[c] = 0.0f;
        for (int64_t l = 0; l < len; l++) {
            const float *v = j->vc + (slots[l] * j->kv_heads + g) * d;
            for (int64_t c = 0; c < d; c++) o[c] += p[l] * v[c];
        }
        for (int64_t c = 0; c < d; c++) o[c] /= sum;
    }
}

static void attn_part(const void *arg, int part, int parts) {
    const attn_job *j = (const attn_job *)arg;
    const int64_t group = j->heads / j->kv_heads;
    float *p = grow(&attn_buf, (size_t)(RT * group * (attn_stride(j) + 1)) * sizeof(float));
    if (!p) return;  /* the caller sees rows of NaN: cg_attend_decode fills them first */
    const int64_t units = j->ntiles * j->kv_heads;  /* (tile, KV head) pairs, split evenly over the parts */
    for (int64_t u = units * part / parts; u < units * (part + 1) / parts; u++) {
        const int64_t t = u / j->kv_heads, g = u % j->kv_heads;
        if (j->d % 8 == 0) {
            attend_vec(j, j->tiles[t], j->tiles[t + 1] - j->tiles[t], g, p);
        } else {
            for (int64_t r = j->tiles[t]; r < j->tiles[t + 1]; r++) attend_scalar(j, r, g, p);
        }
    }
}

/* `shared[r]` (r >= 1) says row r's slot list equals row r - 1's (the rows of one prefill chunk): such rows go in
 * tiles of up to RT. Whatever the tiles, each row's arithmetic is the same (see attend_vec). */
int cg_attend_decode(const float *q, int64_t ldq, const float *kc, const float *vc, const int64_t *idx, int64_t ld_idx,
                     const int64_t *lens, const uint8_t *shared, int64_t nd, int64_t heads, int64_t kv_heads,
                     int64_t d, float scale, float *out) {
    if (nd <= 0) return 0;
    if (kv_heads <= 0 || heads % kv_heads || d <= 0) return -3;
    int64_t longest = 0;
    for (int64_t r = 0; r < nd; r++) {
        if (lens[r] < 1 || lens[r] > ld_idx) return -4;
        longest = lens[r] > longest ? lens[r] : longest;
        for (int64_t c = 0; c < heads * d; c++) out[r * heads * d + c] = NAN;
    }
    int64_t *tiles = grow(&tiles_buf, (size_t)(nd + 1) * sizeof(int64_t));
    if (!tiles) return -2;
    int64_t ntiles = 0;
    for (int64_t r = 0; r < nd; r++)
        if (r == 0 || !shared[r] || r - tiles[ntiles - 1] >= RT) tiles[ntiles++] = r;
    tiles[ntiles] = nd;
    attn_job j = {q, ldq, kc, vc, idx, ld_idx, lens, nd, heads, kv_heads, d, longest, scale, out, tiles, ntiles};
    /* tiles differ in length (a prefill chunk's rows grow by one each): sixteen chunks per thread even out shares */
    int64_t units = ntiles * kv_heads;
    const int64_t threads = cg_pool_threads();
    cg_pool_run(attn_part, &j, threads > 1 ? (int)(units < 16 * threads ? units : 16 * threads) : 1);
    return 0;
}

