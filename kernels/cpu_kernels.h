/* What the CPU kernels' C files share (kernels/cpu_gemm.c: block GEMM, thread pool, layer; kernels/cpu_attention.c:
 * attention over the paged cache), compiled together into one library by kernels/cpu_gemm.py. */
#ifndef COCOON_CPU_KERNELS_H
#define COCOON_CPU_KERNELS_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HIDDEN __attribute__((visibility("hidden")))

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, degree-5 polynomial, 2^n in the exponent), to about 2 ulp; below
 * -87 it is 0, above 88 e^88 */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* A per-thread buffer of at least `need` bytes (64-byte aligned), grown as needed, never shrunk; NULL when out of
 * memory. */
typedef struct {
    void *p;
    size_t size;
} buffer;

static inline void *grow(buffer *b, size_t need) {
    if (need > b->size) {
        free(b->p);
        b->p = aligned_alloc(64, (need + 63) / 64 * 64);
        b->size = b->p ? need : 0;
    }
    return b->p;
}

/* The thread pool (cpu_gemm.c): run fn(arg, part, parts) for every part in [0, parts) on the pool's threads and the
 * caller's; `cg_pool_threads()` is how many take part. */
typedef void (*task_fn)(const void *arg, int part, int parts);
HIDDEN void cg_pool_run(task_fn fn, const void *arg, int parts);
HIDDEN int cg_pool_threads(void);

int cg_attend_decode(const float *q, int64_t ldq, const float *kc, const float *vc, const int64_t *idx, int64_t ld_idx,
                     const int64_t *lens, const uint8_t *shared, int64_t nd, int64_t heads, int64_t kv_heads,
                     int64_t d, float scale, float *out);

#endif
