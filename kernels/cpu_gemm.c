/* Block-quantized GEMM for x86 CPUs with AVX2: y[M, N] = x[M, K] . W[N, K]^T with W in GGUF's Q8_0 or Q4_0/Q4_1
 * blocks (see kernels/quant.py for the planes) and x fp32.
 *
 * Why C and not torch: on an AVX2 CPU torch's packed int4 GEMM widens the nibbles to bf16 (4-8 GB/s at one row) and
 * MKL's fp32 GEMM costs as much for 4 rows as for 8, so a small model's decode step was bound by them. Here, as in
 * llama.cpp, each row of x is quantized once per call to int8 in blocks of 32 (scale = absmax / 127), and a block's
 * dot product is exact integer arithmetic (vpmaddubsw + vpmaddwd) scaled once by d_w * d_x:
 *   Q8_0:  sum_j (d_w q_w[j]) (d_x q_x[j])       = d_w d_x sum_j q_w[j] q_x[j]
 *   Q4_x:  sum_j (d_w q_w[j] + m_w) (d_x q_x[j]) = d_w d_x sum_j q_w[j] q_x[j] + m_w (d_x sum_j q_x[j])
 * No int16 pair can saturate: |q_x| <= 127, |q_w| <= 128 (Q8_0; the sign trick below feeds |q_w| as unsigned) or
 * q_w <= 15 (Q4), so a pair is at most 2 * 128 * 127 = 32512 < 32767.
 *
 * Each weight row is read once per call and used for every row of x (tiles of 4 rows x 2 columns share each loaded
 * block), so a decode step of 8 sequences reads the weights once, and a prefill chunk of 256 rows is compute-bound
 * (round 5: ~40 GMAC/s per core at M=256). Output columns are split over a small pool of threads
 * (`cg_set_threads`): workers spin briefly between calls and then sleep on a condition variable, so an idle
 * engine costs no CPU.
 *
 * The entry points take raw pointers (ctypes); kernels/cpu_gemm.py checks every shape, dtype and contiguity
 * before calling. Scales arrive as fp32 (widened from the file's fp16 once at load: converting in registers
 * cost more than the bytes it saved).
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "cpu_kernels.h"

#define QB 32
#define MAX_THREADS 16
#define TILE 4
#define SPINS 8000

/* ---- activations: fp32 rows -> int8 blocks ------------------------------------------------------------------ */

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One row x[K] -> q[K] int8, d[K/32] (the block scales), s[K/32] = d * sum(q) (for Q4's min term). */
static void quantize_row(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / QB; b++) {
        const float *p = x + b * QB;
        __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
        __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
        __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        float amax = hmax(a);
        float db = amax / 127.0f;
        __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, inv), r));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, inv), r));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, inv), r));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, inv), r));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        /* packs work inside 128-bit lanes: dwords come out as i0lo i1lo i2lo i3lo i0hi i1hi i2hi i3hi */
        __m256i pk = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * QB), _mm256_permutevar8x32_epi32(pk, perm));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        d[b] = db;
        s[b] = db * (float)_mm_cvtsi128_si32(s4);
    }
}

/* ---- block dot products ----------------------------------------------------------------------------------- */

static inline __m256i q4_block(const uint8_t *qs) {
    __m128i b = _mm_loadu_si128((const __m128i *)qs);
    /* byte j: element j in the low nibble, element j + 16 in the high one */
    __m256i w = _mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1);
    return _mm256_and_si256(w, _mm256_set1_epi8(0x0f));
}

/* int32 x 8 partial sums of 32 products: unsigned w (0..15) times signed x */
static inline __m256 dot_u(__m256i w, __m256i x) {
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(p);
}

/* signed w times signed x: |w| as unsigned, x carrying w's sign */
static inline __m256 dot_s(__m256i w, __m256i x) {
    return dot_u(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

typedef struct {
    int q4;             /* 0: Q8_0 (qs int8 [N, K]), 1: Q4 (qs uint8 [N, K/2], m [ceil(N/8), K/32, 8]) */
    const void *qs;
    const float *wd, *wm;
    int64_t n, k;
    const int8_t *xq;   /* [M, K] */
    const float *xd, *xs; /* [M, K/32] */
    const float *xp;      /* [ceil(M/2), K/32, 8]: each row pair's scales as the Q4 tile's lanes hold them */
    int64_t m;
    float *y;
    int64_t ldy;
} gemm_job;

/* Each (row, column) result is the same sum in the same order whatever the tile: acc = fma(dot_b, d_w[b] d_x[b],
 * acc) over b ascending, then hsum(acc) + (sum_b m_w[b] s_x[b], ascending, a product then a sum per step), so a
 * row's result never depends on how many rows came with it (the engine's batches equal requests alone). The Q4
 * min terms go first, eight columns at a time (`min_terms`, over mins stored in panels of 8 columns); the tile
 * adds its sums to them. (Measured: named-register variants with 4 columns per row, and fp16 scales widened in
 * registers, were 5-90% slower on this AVX2 CPU; the min terms summed per (row, column) in the tile cost a third
 * of a long prefill's GEMM time.) */
/* A Q4 tile: mt rows (1-4) by nc columns (1-2). Rows go in pairs whose block sums share a vector: vpmaddubsw gives
 * each row's 16 int16 pair sums (<= 2 * 15 * 127), vphaddw adds neighbours of both rows at once (<= 7620, exact
 * in int16), and one vpmaddwd, one conversion and one fma then serve two rows (lanes 0, 1, 4, 5 hold the first
 * row's partial sums, 2, 3, 6, 7 the second's); a row without a partner is paired with itself. A row's four lanes
 * are the same numbers in the same order whatever its partner or place: acc = fma(lane sums, d_w[b] d_x[b], acc)
 * over b ascending, then ((l0 + l4) + (l1 + l5)) + its min term. (Measured: a third fewer cycles than one row
 * per vector, whose vpmaddwd and fma per row and block kept the multiply pipes full.) */
static inline __attribute__((always_inline)) void tile_q4(const gemm_job *j, int64_t n, int64_t m0, int mt, int nc) {
    const int64_t nb = j->k / QB, k = j->k;
    const int np = (mt + 1) / 2;
    __m256 acc[2][2];
    for (int c = 0; c < 2; c++) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
    const uint8_t *qs = (const uint8_t *)j->qs + n * (k / 2);
    const float *wd = j->wd + n * nb;
    const int8_t *xq = j->xq + m0 * k;
    const float *xp = j->xp + (m0 / 2) * nb * 8;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < nb; b++) {
        __m256i w[2];
        __m256 dw[2];
        for (int c = 0; c < nc; c++) {
            w[c] = q4_block(qs + c * (k / 2) + b * (QB / 2));
            dw[c] = _mm256_broadcast_ss(wd + c * nb + b);
        }
        for (int p = 0; p < np; p++) {
            const int8_t *x0 = xq + 2 * p * k + b * QB;
            const int pair = 2 * p + 1 < mt;
            const __m256i xa = _mm256_loadu_si256((const __m256i *)x0);
            const __m256i xb = pair ? _mm256_loadu_si256((const __m256i *)(x0 + k)) : xa;
            const __m256 s = _mm256_loadu_ps(xp + (p * nb + b) * 8);
            for (int c = 0; c < nc; c++) {
                const __m256i pa = _mm256_maddubs_epi16(w[c], xa);
                const __m256i pb = pair ? _mm256_maddubs_epi16(w[c], xb) : pa;
                const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_hadd_epi16(pa, pb), ones));
                acc[c][p] = _mm256_fmadd_ps(f, _mm256_mul_ps(dw[c], s), acc[c][p]);
            }
        }
    }
    for (int p = 0; p < np; p++)
        for (int c = 0; c < nc; c++) {
            __m128 t = _mm_add_ps(_mm256_castps256_ps128(acc[c][p]), _mm256_extractf128_ps(acc[c][p], 1));
            float l[4];
            _mm_storeu_ps(l, t);
            float *y = j->y + (m0 + 2 * p) * j->ldy + n + c;
            y[0] = (l[0] + l[1]) + y[0];
            if (2 * p + 1 < mt) y[j->ldy] = (l[2] + l[3]) + y[j->ldy];
        }
}

/* A Q8_0 tile: mt rows (1-4) of one column, each row's sums in a vector of its own (Q8_0's int16 pair sums reach
 * 32512: no room to add two), hsum'd at the end. */
static inline __attribute__((always_inline)) void tile_q8(const gemm_job *j, int64_t n, int64_t m0, int mt) {
    const int64_t nb = j->k / QB;
    __m256 acc[TILE];
    for (int t = 0; t < TILE; t++) acc[t] = _mm256_setzero_ps();
    const float *wd = j->wd + n * nb;
    const int8_t *xq = j->xq + m0 * j->k;
    const float *xd = j->xd + m0 * nb;
    const int8_t *qs = (const int8_t *)j->qs + n * j->k;
    for (int64_t b = 0; b < nb; b++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(qs + b * QB));
        for (int t = 0; t < mt; t++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(xq + t * j->k + b * QB));
            acc[t] = _mm256_fmadd_ps(dot_s(w, x), _mm256_set1_ps(wd[b] * xd[t * nb + b]), acc[t]);
        }
    }
    for (int t = 0; t < mt; t++) j->y[(m0 + t) * j->ldy + n] = hsum(acc[t]);
}

/* y[r, c] = sum_b m_w[c, b] s_x[r, b] (b ascending) for every row and the columns [n0, n1), n0 a multiple of 8. The
 * mins come in panels of 8 columns, [ceil(N/8), K/32, 8] (zero-padded): a row of [K/32, N] would put every block's
 * mins 4 KB apart here (N = 3072 floats), where they evict each other from the L1 cache. */
static void min_terms(const gemm_job *j, int64_t n0, int64_t n1) {
    const int64_t nb = j->k / QB;
    for (int64_t r = 0; r < j->m; r++) {
        const float *xs = j->xs + r * nb;
        float *y = j->y + r * j->ldy;
        int64_t c = n0;
        for (; c + 32 <= n1; c += 32) {  /* four panels, four independent sums in flight */
            const float *w = j->wm + c * nb;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t b = 0; b < nb; b++) {
                const __m256 x = _mm256_set1_ps(xs[b]);
                a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(w + b * 8), x));
                a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(w + (nb + b) * 8), x));
                a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(w + (2 * nb + b) * 8), x));
                a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(w + (3 * nb + b) * 8), x));
            }
            _mm256_storeu_ps(y + c, a0);
            _mm256_storeu_ps(y + c + 8, a1);
            _mm256_storeu_ps(y + c + 16, a2);
            _mm256_storeu_ps(y + c + 24, a3);
        }
        for (; c < n1; c += 8) {  /* the same sums one panel at a time; the last may be partly padding */
            const float *w = j->wm + c * nb;
            __m256 a = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(w + b * 8),
                                                                                _mm256_set1_ps(xs[b])));
            if (c + 8 <= n1) {
                _mm256_storeu_ps(y + c, a);
            } else {
                float t[8];
                _mm256_storeu_ps(t, a);
                for (int64_t i = 0; i < n1 - c; i++) y[c + i] = t[i];
            }
        }
    }
}

/* constant tile sizes below, so the compiler unrolls each */
static void q4_rows(const gemm_job *j, int64_t n, int nc) {
    int64_t m0 = 0;
    for (; m0 + TILE <= j->m; m0 += TILE) tile_q4(j, n, m0, TILE, nc);
    switch (j->m - m0) {
        case 3: tile_q4(j, n, m0, 3, nc); break;
        case 2: tile_q4(j, n, m0, 2, nc); break;
        case 1: tile_q4(j, n, m0, 1, nc); break;
        default: break;
    }
}

static void run_columns(const gemm_job *j, int64_t n0, int64_t n1) {
    if (j->q4) {
        min_terms(j, n0, n1);
        int64_t n = n0;
        for (; n + 2 <= n1; n += 2) q4_rows(j, n, 2);
        if (n < n1) q4_rows(j, n, 1);
        return;
    }
    for (int64_t n = n0; n < n1; n++) {
        int64_t m0 = 0;
        for (; m0 + TILE <= j->m; m0 += TILE) tile_q8(j, n, m0, TILE);
        switch (j->m - m0) {
            case 3: tile_q8(j, n, m0, 3); break;
            case 2: tile_q8(j, n, m0, 2); break;
            case 1: tile_q8(j, n, m0, 1); break;
            default: break;
        }
    }
}

/* ---- a tiny thread pool --------------------------------------------------------------------------------------- */

static int pool_size = 1;               /* threads taking part in a call, the caller included */
static pthread_t workers[MAX_THREADS];
static int started = 0;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
/* The current task: `parts` chunks that every thread (the caller included) claims one at a time until none is
 * left, so a worker the kernel has descheduled (other processes on the cores) delays only the chunk it holds:
 * the caller takes the rest itself instead of waiting for a fixed share. `claims` packs (generation << 32 |
 * next chunk); a thread only claims in the generation it woke for. */
static task_fn current_fn = NULL;
static const void *current_arg = NULL;
static int current_parts = 1;
static _Atomic uint64_t claims = 0;
static atomic_int done_parts = 0;

static int claim(uint32_t gen) {
    uint64_t v = atomic_load_explicit(&claims, memory_order_acquire);
    for (;;) {
        if ((uint32_t)(v >> 32) != gen || (uint32_t)v >= (uint32_t)current_parts) return -1;
        if (atomic_compare_exchange_weak_explicit(&claims, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
            return (int)(uint32_t)v;
    }
}

static void work(uint32_t gen) {
    int part;
    while ((part = claim(gen)) >= 0) {
        current_fn(current_arg, part, current_parts);
        atomic_fetch_add_explicit(&done_parts, 1, memory_order_acq_rel);
    }
}

static void part_range(const gemm_job *j, int part, int parts, int64_t *n0, int64_t *n1) {
    /* multiples of 8 columns, so two threads never write the same cache line of y */
    int64_t chunks = (j->n + 7) / 8;
    *n0 = (chunks * part / parts) * 8;
    *n1 = (chunks * (part + 1) / parts) * 8;
    if (*n1 > j->n) *n1 = j->n;
}

static void gemm_part(const void *arg, int part, int parts) {
    const gemm_job *j = (const gemm_job *)arg;
    int64_t n0, n1;
    part_range(j, part, parts, &n0, &n1);
    run_columns(j, n0, n1);
}

static void *worker_main(void *arg) {
    (void)arg;
    uint32_t seen = 0;
    for (;;) {
        uint32_t g;
        int spins = 0;
        while ((g = (uint32_t)(atomic_load_explicit(&claims, memory_order_acquire) >> 32)) == seen) {
            /* spin ~0.2 ms, then sleep. The gap between two GEMMs of a decode step (one layer's attention on
             * torch) is ~50-100 us: a worker that slept there had to be woken for every layer, which made
             * two threads slower than one at batch 1 (measured through the gateway: 27 vs 47 tok/s with a
             * shorter spin, 81 tok/s with this one). Between steps and when idle it sleeps. */
            if (++spins < SPINS) { _mm_pause(); continue; }
            pthread_mutex_lock(&lock);
            while ((g = (uint32_t)(atomic_load_explicit(&claims, memory_order_acquire) >> 32)) == seen)
                pthread_cond_wait(&wake, &lock);
            pthread_mutex_unlock(&lock);
            break;
        }
        seen = g;
        work(g);
    }
    return NULL;
}

int cg_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&lock);
    while (started < n - 1) {
        if (pthread_create(&workers[started], NULL, worker_main, NULL) != 0) break;
        pthread_detach(workers[started]);
        started++;
    }
    pool_size = started + 1 < n ? started + 1 : n;
    pthread_mutex_unlock(&lock);
    return pool_size;
}

int cg_pool_threads(void) { return pool_size; }

/* Run fn(arg, part, parts) for every part in [0, parts), on the pool's threads and the caller's. One caller at a time
 * per process uses the pool; a second caller (another Python thread) runs every part itself. */
static atomic_flag pool_busy = ATOMIC_FLAG_INIT;
static uint32_t last_gen = 0;

void cg_pool_run(task_fn fn, const void *arg, int parts) {
    if (parts <= 1 || pool_size <= 1 || atomic_flag_test_and_set(&pool_busy)) {
        for (int p = 0; p < parts; p++) fn(arg, p, parts);
        return;
    }
    /* Close the last task before touching it: a worker that woke for it late must not claim a part of it once
     * current_parts grows, nor run the new fn on the old arg (it did: a segfault every few hundred calls once
     * calls with different part counts came back to back). A generation whose next part is UINT32_MAX has
     * nothing to claim; workers that see it wait for the next. */
    atomic_store_explicit(&claims, (uint64_t)++last_gen << 32 | UINT32_MAX, memory_order_seq_cst);
    atomic_thread_fence(memory_order_seq_cst);
    current_fn = fn;
    current_arg = arg;
    current_parts = parts;
    atomic_store_explicit(&done_parts, 0, memory_order_relaxed);
    uint32_t gen = ++last_gen;
    pthread_mutex_lock(&lock);
    atomic_store_explicit(&claims, (uint64_t)gen << 32, memory_order_release);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&lock);
    work(gen);
    /* only chunks a worker holds are left: after a short spin, yield the core (it may be waiting for it) */
    for (int spins = 0; atomic_load_explicit(&done_parts, memory_order_acquire) < parts; spins++) {
        if (spins < SPINS) _mm_pause();
        else sched_yield();
    }
    atomic_flag_clear(&pool_busy);
}

/* ---- entry points ----------------------------------------------------------------------------------------------- */

typedef struct {
    int q4;
    const void *qs;
    const float *d, *m;
    int64_t n, k;
} weight;

/* per calling thread: the int8 rows of x and their scales; the layer tail's and the decode layer's intermediates */
static _Thread_local buffer scratch, tail_buf, layer_buf;

typedef struct {
    const float *x;
    int64_t ldx, k, m;
    int8_t *xq;
    float *xd, *xs;
} quant_job;

static void quantize_part(const void *arg, int part, int parts) {
    const quant_job *q = (const quant_job *)arg;
    const int64_t nb = q->k / QB;
    for (int64_t i = q->m * part / parts; i < q->m * (part + 1) / parts; i++)
        quantize_row(q->x + i * q->ldx, q->k, q->xq + i * q->k, q->xd + i * nb, q->xs + i * nb);
}

static int gemm_run(const weight *w, const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy) {
    const int64_t n = w->n, k = w->k;
    if (k % QB || m < 0 || n < 0) return -1;
    if (m == 0 || n == 0) return 0;
    int64_t nb = k / QB;
    const int64_t pairs = (m + 1) / 2;
    int8_t *xq = grow(&scratch, (size_t)(((m * k + 63) / 64) * 64) + sizeof(float) * (size_t)((2 * m + 8 * pairs) * nb));
    if (!xq) return -2;
    float *xd = (float *)(xq + ((m * k + 63) / 64) * 64);
    float *xs = xd + m * nb, *xp = xs + m * nb;
    quant_job qj = {x, ldx, k, m, xq, xd, xs};
    /* many rows (a prefill chunk): quantized on every thread, not on the caller's alone */
    cg_pool_run(quantize_part, &qj, pool_size > 1 && m >= 32 ? 2 * pool_size : 1);
    if (w->q4)
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t b = 0; b < nb; b++) {
                const float d0 = xd[2 * p * nb + b], d1 = 2 * p + 1 < m ? xd[(2 * p + 1) * nb + b] : d0;
                const __m256 v = _mm256_setr_ps(d0, d0, d1, d1, d0, d0, d1, d1);
                _mm256_storeu_ps(xp + (p * nb + b) * 8, v);
            }
    gemm_job j = {w->q4, w->qs, w->d, w->m, n, k, xq, xd, xs, xp, m, y, ldy};
    /* chunks of at least 64 columns, four per thread: a late thread costs a quarter of its share */
    int64_t chunks = n / 64 < 4 * pool_size ? n / 64 : 4 * pool_size;
    cg_pool_run(gemm_part, &j, pool_size > 1 && chunks > 1 ? (int)chunks : 1);
    return 0;
}

int cg_gemm(int q4, const void *qs, const float *wd, const float *wm, int64_t n, int64_t k,
            const float *x, int64_t m, int64_t ldx, float *y, int64_t ldy) {
    weight w = {q4, qs, wd, wm, n, k};
    return gemm_run(&w, x, m, ldx, y, ldy);
}

/* dst[c] = silu(g[c]) u[c] = g[c] / (1 + e^-g[c]) u[c], eight at a time (n is a multiple of 32: a GEMM's K) */
static void silu_mul(const float *g, const float *u, int64_t n, float *dst) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t c = 0; c < n; c += 8) {
        const __m256 gv = _mm256_loadu_ps(g + c);
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_xor_ps(gv, sign))));
        _mm256_storeu_ps(dst + c, _mm256_mul_ps(s, _mm256_loadu_ps(u + c)));
    }
}

/* x[row] = h[row] * rsqrt(mean(h[row]^2) + eps) * g */
static void rms_norm_rows(const float *h, int64_t m, int64_t dim, const float *g, float eps, float *x) {
    for (int64_t i = 0; i < m; i++) {
        const float *r = h + i * dim;
        double ss = 0.0;
        for (int64_t c = 0; c < dim; c++) ss += (double)r[c] * r[c];
        float scale = 1.0f / sqrtf((float)(ss / (double)dim) + eps);
        for (int64_t c = 0; c < dim; c++) x[i * dim + c] = r[c] * scale * g[c];
    }
}

/* The rest of a Llama layer after attention, in one call (on CPU a decode step was bound by the ~15 small torch
 * ops per layer this replaces):
 *   h += a . O^T;  x = rms_norm(h) * ln_ffn;  [g | u] = x . GU^T;  h += (silu(g) * u) . DOWN^T;
 *   out = rms_norm(h) * ln_next
 * h [m, hidden] is updated in place; a [m, o.k]; out [m, hidden]. */
int cg_layer_tail(const weight *o, const weight *gu, const weight *down, const float *ln_ffn, const float *ln_next,
                  float eps, float *h, const float *a, int64_t m, float *out) {
    const int64_t hidden = o->n, inter = down->k;
    if (gu->k != hidden || gu->n != 2 * inter || down->n != hidden) return -3;
    if (inter % QB) return -1;
    if (m <= 0) return 0;
    float *t = grow(&tail_buf, (size_t)(m * (hidden + 3 * inter)) * sizeof(float));
    if (!t) return -2;
    float *gub = t + m * hidden, *g = gub + m * 2 * inter;
    int rc = gemm_run(o, a, m, o->k, t, hidden);
    if (rc) return rc;
    for (int64_t i = 0; i < m * hidden; i++) h[i] += t[i];
    rms_norm_rows(h, m, hidden, ln_ffn, eps, out);
    if ((rc = gemm_run(gu, out, m, hidden, gub, 2 * inter))) return rc;
    for (int64_t i = 0; i < m; i++) silu_mul(gub + i * 2 * inter, gub + i * 2 * inter + inter, inter, g + i * inter);
    if ((rc = gemm_run(down, g, m, inter, t, hidden))) return rc;
    for (int64_t i = 0; i < m * hidden; i++) h[i] += t[i];
    rms_norm_rows(h, m, hidden, ln_next, eps, out);
    return 0;
}

/* ---- rotary and a whole decode layer ----------------------------------------------------------------------------- */

/* Rotate-half rotary embedding in place on heads [0, nheads) of each row of x (row stride ldx, heads of d
 * contiguous): y[j] = x[j] c_j - x[j + d/2] s_j, y[j + d/2] = x[j + d/2] c_j + x[j] s_j, with c, s the rows
 * pos[r] of the [positions, d/2] tables. */
void cg_rotary(float *x, int64_t ldx, int64_t rows, int64_t nheads, int64_t d, const float *cos_t, const float *sin_t,
               const int64_t *pos) {
    const int64_t half = d / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_t + pos[r] * half, *s = sin_t + pos[r] * half;
        for (int64_t h = 0; h < nheads; h++) {
            float *v = x + r * ldx + h * d;
            for (int64_t j = 0; j < half; j++) {
                const float a = v[j], b = v[j + half];
                v[j] = a * c[j] - b * s[j];
                v[j + half] = b * c[j] + a * s[j];
            }
        }
    }
}

/* One Llama layer in one call, for rows that each attend over their own list of cache slots (a decode token over
 * its sequence, a prefill row at position p over positions 0..p; every row's K and V are written first):
 *   qkv = x . QKV^T; rotary on Q and K at pos; K, V written to the layer's cache at slots[r];
 *   attention of each row over its own cache slots idx[r, :lens[r]] (as cg_attend_decode); cg_layer_tail.
 * x [t, hidden] is the normed input, h the residual (updated), out the next layer's normed input. */
int cg_decode_layer(const weight *qkv, const weight *o, const weight *gu, const weight *down, const float *ln_ffn,
                    const float *ln_next, float eps, const float *cos_t, const float *sin_t, const int64_t *pos,
                    const int64_t *slots, float *kc, float *vc, const int64_t *idx, int64_t ld_idx,
                    const int64_t *lens, const uint8_t *shared, int64_t t, int64_t heads, int64_t kv_heads,
                    int64_t d, float scale, float *h, const float *x, float *out) {
    const int64_t width = (heads + 2 * kv_heads) * d;
    if (qkv->n != width || qkv->k != o->n || o->k != heads * d) return -3;
    if (t <= 0) return 0;
    float *q = grow(&layer_buf, (size_t)(t * (width + heads * d)) * sizeof(float));
    if (!q) return -2;
    float *a = q + t * width;
    int rc = gemm_run(qkv, x, t, qkv->k, q, width);
    if (rc) return rc;
    cg_rotary(q, width, t, heads + kv_heads, d, cos_t, sin_t, pos);
    for (int64_t r = 0; r < t; r++) {
        memcpy(kc + slots[r] * kv_heads * d, q + r * width + heads * d, (size_t)(kv_heads * d) * sizeof(float));
        memcpy(vc + slots[r] * kv_heads * d, q + r * width + (heads + kv_heads) * d,
               (size_t)(kv_heads * d) * sizeof(float));
    }
    if ((rc = cg_attend_decode(q, width, kc, vc, idx, ld_idx, lens, shared, t, heads, kv_heads, d, scale, a)))
        return rc;
    return cg_layer_tail(o, gu, down, ln_ffn, ln_next, eps, h, a, t, out);
}
