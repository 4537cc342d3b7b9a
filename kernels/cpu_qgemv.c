/* Weight-only 4- and 8-bit GEMV with int8 activations on AVX512-VNNI (llama.cpp's Q4_1 x Q8_1 scheme), split over
 * a small pool of threads. Built with cpu_ops.c into one library by kernels/cpu_ops.py; kernels/cpu_qgemv.py packs
 * the weights, checks shapes and holds the PyTorch twin. Without AVX512-VNNI (or F16C) this file compiles to
 * `qgemv_available() == 0` and nothing else runs.
 *
 * Weights in tiles of 4 rows x one group of 32 columns: w[n, k] = d * u + m, u unsigned (4 bits: the code; 8 bits:
 * a Q8_0 code + 128, m = -128 d). `tiles` (N/4, K/32, 64 | 128 bytes): 4 bits, row r's 16 bytes at 16r, byte j
 * holding column j (low nibble) and j + 16 (high), GGUF's Q4_1 order; 8 bits, columns 0-15 of rows 0-3 then 16-31.
 * `dm` (N/4, K/32, 8) fp16: d of rows 0-3, then m of rows 0-3.
 * Activations: each row's groups of 32 as int8 codes q with dx = amax / 127, and sx = dx * sum(q) for the m term:
 *   y[n] = sum_g d[n,g] dx[g] sum_j u[n,j] q[j] + m[n,g] sx[g].
 * One `vpdpbusd` multiplies 64 (u, q) byte pairs: 4 rows x 16 columns a tile half.
 *
 * Threads: the caller and up to `threads - 1` workers claim chunks of tiles from one atomic counter, so a worker that
 * the OS has preempted (a busy 2-core machine) costs the step the one chunk it holds, not its whole share. Workers
 * spin between calls (a decode step's GEMVs are tens of microseconds apart) and sleep after SPIN_NS without one.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "cpu_bf16.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>
#define QGEMV_SIMD 1
#else
#define QGEMV_SIMD 0
#endif

int qgemv_available(void) { return QGEMV_SIMD; }

#if QGEMV_SIMD
#define MAX_THREADS 64
#define MAX_ROWS 16      /* activation rows a call (decode batch) */
#define MAX_K 16384      /* columns a call (a 7B's down_proj: 11008; a 13B's: 13824) */
#define SPIN_NS 2000000  /* a worker's spin before it sleeps: 2 ms */

typedef struct {
    const uint8_t *tiles;
    const uint16_t *dm;
    int64_t bits, N, K, M, chunk, nchunks, participants;
    const int8_t *xq;
    const float *xd, *xs;
    void *y;              /* (M, N), x's dtype */
    const void *residual; /* (M, N) or NULL: added after the rounding to x's dtype */
    int bf16;
} job_t;

static job_t job;
static atomic_llong claim;  /* generation << 32 | next chunk */
static atomic_llong done;   /* generation << 32 | chunks finished */
static atomic_llong posted; /* the generation of the latest job */
static atomic_int sleepers;
static int workers;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

static pthread_mutex_t calls = PTHREAD_MUTEX_INITIALIZER; /* one call at a time: `job` is shared */

/* y = round(dot) [+ residual, rounded again]: `residual + linear(x)` in x's dtype. */
static inline void store_out(const job_t *j, int64_t at, float dot) {
    if (j->bf16) {
        float v = bf16_to_f32(f32_to_bf16(dot));
        if (j->residual) v += bf16_to_f32(((const uint16_t *)j->residual)[at]);
        ((uint16_t *)j->y)[at] = f32_to_bf16(v);
    } else {
        ((float *)j->y)[at] = j->residual ? dot + ((const float *)j->residual)[at] : dot;
    }
}

/* 4 rows x M activation rows over all K/32 groups of one tile column: out[m * N + row]. */
static void tile_dot(const job_t *j, int64_t t) {
    int64_t G = j->K / 32, step = j->bits == 4 ? 64 : 128;
    const uint8_t *w = j->tiles + t * G * step;
    const uint16_t *dm = j->dm + t * G * 8;
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    for (int64_t m = 0; m < j->M; m++) {
        const int8_t *xq = j->xq + m * j->K;
        const float *xd = j->xd + m * G, *xs = j->xs + m * G;
        __m512 acc = _mm512_setzero_ps();
        __m128 macc = _mm_setzero_ps();
        for (int64_t g = 0; g < G; g++) {
            __m512i lo, hi;
            if (j->bits == 4) {
                __m512i v = _mm512_loadu_si512(w + g * 64);
                lo = _mm512_and_si512(v, low);
                hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            } else {
                lo = _mm512_loadu_si512(w + g * 128);
                hi = _mm512_loadu_si512(w + g * 128 + 64);
            }
            __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + g * 32)));
            __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + g * 32 + 16)));
            __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo);
            s = _mm512_dpbusd_epi32(s, hi, xhi);  /* lanes 4r..4r+3: row r's partial sums */
            __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + g * 8)));  /* d0..d3, m0..m3 */
            __m512 d = _mm512_permutexvar_ps(spread, _mm512_castps256_ps512(f));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(xd[g])), acc);
            macc = _mm_fmadd_ps(_mm256_extractf128_ps(f, 1), _mm_set1_ps(xs[g]), macc);
        }
        float a[16], mm[4];
        _mm512_storeu_ps(a, acc);
        _mm_storeu_ps(mm, macc);
        for (int r = 0; r < 4; r++)
            store_out(j, m * j->N + t * 4 + r, (a[4 * r] + a[4 * r + 1]) + (a[4 * r + 2] + a[4 * r + 3]) + mm[r]);
    }
}

/* Claim and run chunks of generation `gen` until none is left. */
static void run_chunks(long long gen) {
    for (;;) {
        long long v = atomic_load_explicit(&claim, memory_order_acquire);
        if ((v >> 32) != gen || (v & 0xffffffffLL) >= job.nchunks) return;
        if (!atomic_compare_exchange_weak_explicit(&claim, &v, v + 1, memory_order_acq_rel, memory_order_relaxed))
            continue;
        int64_t c = v & 0xffffffffLL, t0 = c * job.chunk, t1 = t0 + job.chunk, tiles = job.N / 4;
        for (int64_t t = t0; t < (t1 < tiles ? t1 : tiles); t++) tile_dot(&job, t);
        atomic_fetch_add_explicit(&done, 1, memory_order_acq_rel);
    }
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void *worker(void *arg) {
    long id = (long)arg;
    long long seen = 0;
    for (;;) {
        int64_t start = now_ns();
        unsigned spins = 0;
        while (atomic_load_explicit(&posted, memory_order_acquire) == seen) {
            _mm_pause();
            if (++spins % 64 == 0) sched_yield(); /* an oversubscribed core: let the caller's thread run */
            if (spins % 4096 == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&mu);
                atomic_fetch_add(&sleepers, 1);
                while (atomic_load(&posted) == seen) pthread_cond_wait(&wake, &mu);
                atomic_fetch_sub(&sleepers, 1);
                pthread_mutex_unlock(&mu);
            }
        }
        seen = atomic_load_explicit(&posted, memory_order_acquire);
        if (id < job.participants - 1) run_chunks(seen);
    }
    return NULL;
}

static void ensure_workers(int n) {
    while (workers < n && workers < MAX_THREADS - 1) {
        pthread_t th;
        if (pthread_create(&th, NULL, worker, (void *)(long)workers) != 0) return;
        pthread_detach(th);
        workers++;
    }
}

/* Row m's groups of 32 as int8 codes (round half to even, as torch.round), dx and sx = dx * sum(q). */
static void quantize_row(const void *x, int bf16, int64_t K, int8_t *q, float *dx, float *sx) {
    float v[32];
    for (int64_t g = 0; g < K / 32; g++) {
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            if (bf16) {
                uint32_t u = (uint32_t)((const uint16_t *)x)[g * 32 + i] << 16;
                memcpy(v + i, &u, 4);
            } else {
                v[i] = ((const float *)x)[g * 32 + i];
            }
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            int c = (int)nearbyintf(v[i] * id);
            q[g * 32 + i] = (int8_t)c;
            sum += c;
        }
        dx[g] = d;
        sx[g] = d * (float)sum;
    }
}
#endif

/* y (M, N) = [residual +] x (M, K) times the tiled weight's transpose; x, y, residual fp32 or bf16 (`bf16`), x's
 * rows stride_x apart, y and residual contiguous. M <= 16, K <= 16384, K % 32 == 0, N % 4 == 0. */
void qgemv(const void *x, int64_t stride_x, int64_t bf16, int64_t M, const uint8_t *tiles, const uint16_t *dm,
           int64_t bits, int64_t N, int64_t K, void *y, const void *residual, int64_t threads) {
#if QGEMV_SIMD
    /* the quantized activations: 320 KB at most, per calling thread (not its stack: a thread's may be small); the
     * workers read them through `job` while this thread waits for them */
    static _Thread_local int8_t xq[MAX_ROWS * MAX_K];
    static _Thread_local float xd[MAX_ROWS * (MAX_K / 32)], xs[MAX_ROWS * (MAX_K / 32)];
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * stride_x * (bf16 ? 2 : 4), bf16, K, xq + m * K, xd + m * (K / 32),
                     xs + m * (K / 32));
    threads = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    int64_t tiles_n = N / 4, per = tiles_n / (threads * 8);  /* ~8 chunks a thread: room to rebalance */
    per = per < 4 ? 4 : per;
    pthread_mutex_lock(&calls);
    long long gen = (atomic_load(&posted) + 1) & 0x7fffffffLL;
    job = (job_t){tiles, dm, bits, N, K, M, per, (tiles_n + per - 1) / per, threads, xq, xd, xs, y, residual,
                  (int)bf16};
    if (threads > 1) ensure_workers((int)threads - 1);
    atomic_store_explicit(&done, 0, memory_order_release);
    atomic_store_explicit(&claim, gen << 32, memory_order_release);
    atomic_store_explicit(&posted, gen, memory_order_release);
    if (threads > 1 && atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&mu);
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&mu);
    }
    run_chunks(gen);
    for (unsigned spins = 1; atomic_load_explicit(&done, memory_order_acquire) < job.nchunks; spins++) {
        _mm_pause();
        if (spins % 64 == 0) sched_yield(); /* a preempted worker holds a chunk: let it run */
    }
    pthread_mutex_unlock(&calls);
#else
    (void)x; (void)stride_x; (void)bf16; (void)M; (void)tiles; (void)dm; (void)bits; (void)N; (void)K; (void)y;
    (void)residual; (void)threads;
#endif
}
