/* One decode step of a Llama-family model on the CPU, fp32, in one call (workers/reference/native.py).
 *
 * Why: on a small model, a decode step in eager torch is ~30 operator calls a layer, each a few
 * microseconds of dispatch, plus gathers of the paged KV cache into contiguous tensors. Here a step is
 * one call (ctypes releases the GIL): embedding, and per layer RMSNorm, the fused q/k/v matmul, RoPE,
 * the K/V write into the pool, attention read straight from the pool's blocks, the output matmul, RMSNorm,
 * the fused gate/up matmul, SiLU * up, the down matmul; then the final norm and the LM head.
 *
 * The same arithmetic as the torch path in model.py (weights already permuted and q pre-scaled by
 * DecoderModel.load), in the same order where it matters for rounding: (x * rsqrt(mean(x^2) + eps)) * w,
 * (W x + b) + residual, softmax probabilities before the weighted sum of V. Sums run in a different order
 * than MKL/oneDNN's, so logits differ in the last bits (tests compare to transformers token for token).
 *
 * Matmuls: weights are packed by native.py into panels [N/16][K][16] (N a multiple of 16), so one pass
 * over a panel serves up to 8 rows: 8 vector accumulators of 16 floats, one weight load per k. GCC's
 * vector extensions keep this portable; the matmul tile is the one place written per vector width:
 * v16 with AVX-512, tile_v8 (8-float vectors) without it.
 * drt_vector_bits() says which width a build has; bench/reference_engine.py --profile times each op of a
 * step (a -DDRT_PROFILE build) for this CPU's build and for an AVX2 one.
 *
 * Threads (drt_pool_create, the engine's --threads): each matmul is split by output panels and each layer's
 * attention by rows, so every output element gets the same arithmetic whatever the thread count (bitwise
 * equal results).
 *
 * Pool layout (kv_cache.py): [blocks, layers, block_size, 2 (K, V), kv_heads, head_dim], fp32.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16), aligned(4)));

enum { NB = 16, MB = 8, LAYER_PTRS = 10 };
enum { LN1, QKV, QKV_B, O, O_B, LN2, GU, GU_B, DOWN, DOWN_B };

typedef struct {
    int32_t hidden, heads, kv_heads, head_dim, inter, vocab, layers, block_size;
    float eps;
    const float *embed; /* [vocab, hidden] */
    const float *norm;  /* [hidden] */
    const float *head;  /* packed [vocab/16][hidden][16] */
    const float *const *lw; /* layers * LAYER_PTRS pointers (biases may be NULL) */
} drt_model;

#if !defined(__AVX512F__)
/* acc[m] (m < mm <= 8) = rows r0 + m * ldx (K long) times one panel wf [K][16], in 8-float vectors.
 * Without AVX-512 a v16 is two registers, and the v16 code below spills: the 8-row tile needs 16
 * accumulators + the weight, more than the 16 registers an AVX2 CPU has (or 32 NEON ones: v16 is four
 * there), and even a one-row v16 loop came out ~9x slower than the AVX-512 build here (bench/reference_engine.py --profile, "no-avx512"). So: the
 * 8-row tile as two passes of 8 columns (8 accumulators + 1 weight each; the second pass reads the panel
 * again, from cache), fewer rows 4 or 1 at a time over both halves. Each output element sums the same
 * products in the same order as the v16 code. */
static void tile_v8(int mm, int K, const float *r0, int ldx, const float *wf, v16 *acc) {
    if (mm == MB) {
        const float *r1 = r0 + ldx, *r2 = r1 + ldx, *r3 = r2 + ldx, *r4 = r3 + ldx, *r5 = r4 + ldx,
                    *r6 = r5 + ldx, *r7 = r6 + ldx;
        for (int half = 0; half < 2; half++) {
            const float *wh = wf + half * (NB / 2);
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            for (int k = 0; k < K; k++) {
                v8 wk = *(const v8 *)(wh + (size_t)k * NB); /* v8 is aligned(4): any float address */
                a0 += r0[k] * wk; a1 += r1[k] * wk; a2 += r2[k] * wk; a3 += r3[k] * wk;
                a4 += r4[k] * wk; a5 += r5[k] * wk; a6 += r6[k] * wk; a7 += r7[k] * wk;
            }
            /* One memcpy per accumulator (an array of their addresses kept them in memory). */
            const size_t off = half * sizeof(v8);
            memcpy((char *)&acc[0] + off, &a0, sizeof a0); memcpy((char *)&acc[1] + off, &a1, sizeof a1);
            memcpy((char *)&acc[2] + off, &a2, sizeof a2); memcpy((char *)&acc[3] + off, &a3, sizeof a3);
            memcpy((char *)&acc[4] + off, &a4, sizeof a4); memcpy((char *)&acc[5] + off, &a5, sizeof a5);
            memcpy((char *)&acc[6] + off, &a6, sizeof a6); memcpy((char *)&acc[7] + off, &a7, sizeof a7);
        }
        return;
    }
    int m = 0;
    for (; m + 4 <= mm; m += 4) {
        const float *q0 = r0 + (size_t)m * ldx, *q1 = q0 + ldx, *q2 = q1 + ldx, *q3 = q2 + ldx;
        v8 l0 = {0}, l1 = {0}, l2 = {0}, l3 = {0}, h0 = {0}, h1 = {0}, h2 = {0}, h3 = {0};
        for (int k = 0; k < K; k++) {
            v8 wl = *(const v8 *)(wf + (size_t)k * NB), wh = *(const v8 *)(wf + (size_t)k * NB + NB / 2);
            l0 += q0[k] * wl; h0 += q0[k] * wh; l1 += q1[k] * wl; h1 += q1[k] * wh;
            l2 += q2[k] * wl; h2 += q2[k] * wh; l3 += q3[k] * wl; h3 += q3[k] * wh;
        }
        memcpy(&acc[m], &l0, sizeof l0); memcpy((char *)&acc[m] + sizeof(v8), &h0, sizeof h0);
        memcpy(&acc[m + 1], &l1, sizeof l1); memcpy((char *)&acc[m + 1] + sizeof(v8), &h1, sizeof h1);
        memcpy(&acc[m + 2], &l2, sizeof l2); memcpy((char *)&acc[m + 2] + sizeof(v8), &h2, sizeof h2);
        memcpy(&acc[m + 3], &l3, sizeof l3); memcpy((char *)&acc[m + 3] + sizeof(v8), &h3, sizeof h3);
    }
    for (; m < mm; m++) {
        const float *q = r0 + (size_t)m * ldx;
        v8 lo = {0}, hi = {0};
        for (int k = 0; k < K; k++) {
            lo += q[k] * *(const v8 *)(wf + (size_t)k * NB);
            hi += q[k] * *(const v8 *)(wf + (size_t)k * NB + NB / 2);
        }
        memcpy(&acc[m], &lo, sizeof lo);
        memcpy((char *)&acc[m] + sizeof(v8), &hi, sizeof hi);
    }
}
#endif

/* Columns [16 p0, 16 p1) of y[m, :] (row stride ldy) = x[m, :K] (row stride ldx) @ W^T (+ b) (+ y if
 * accumulate), m < M. */
static void linear_panels(int M, int K, const float *x, int ldx, const float *wp, const float *bias, float *y,
                          int ldy, int accumulate, int p0, int p1) {
    for (int p = p0; p < p1; p++) {
        const v16 *w = (const v16 *)(wp + (size_t)p * K * NB);
        v16 b = {0};
        if (bias) memcpy(&b, bias + p * NB, sizeof b);
        for (int m0 = 0; m0 < M; m0 += MB) {
            int mm = M - m0 < MB ? M - m0 : MB;
            const float *r0 = x + (size_t)m0 * ldx;
            v16 acc[MB] = {{0}};
#if defined(__AVX512F__)
            if (mm == MB) {
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
                const float *r1 = r0 + ldx, *r2 = r1 + ldx, *r3 = r2 + ldx, *r4 = r3 + ldx, *r5 = r4 + ldx,
                            *r6 = r5 + ldx, *r7 = r6 + ldx;
                for (int k = 0; k < K; k++) {
                    v16 wk = w[k];
                    a0 += r0[k] * wk; a1 += r1[k] * wk; a2 += r2[k] * wk; a3 += r3[k] * wk;
                    a4 += r4[k] * wk; a5 += r5[k] * wk; a6 += r6[k] * wk; a7 += r7[k] * wk;
                }
                acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
                acc[4] = a4; acc[5] = a5; acc[6] = a6; acc[7] = a7;
            } else if (mm >= 4) {
                v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                const float *r1 = r0 + ldx, *r2 = r1 + ldx, *r3 = r2 + ldx;
                for (int k = 0; k < K; k++) {
                    v16 wk = w[k];
                    a0 += r0[k] * wk; a1 += r1[k] * wk; a2 += r2[k] * wk; a3 += r3[k] * wk;
                }
                acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
                for (int m = 4; m < mm; m++) {
                    const float *r = r0 + (size_t)m * ldx;
                    v16 a = {0};
                    for (int k = 0; k < K; k++) a += r[k] * w[k];
                    acc[m] = a;
                }
            } else {
                for (int m = 0; m < mm; m++) {
                    const float *r = r0 + (size_t)m * ldx;
                    v16 a = {0};
                    for (int k = 0; k < K; k++) a += r[k] * w[k];
                    acc[m] = a;
                }
            }
#else
            tile_v8(mm, K, r0, ldx, (const float *)w, acc);
#endif
            for (int m = 0; m < mm; m++) {
                float *out = y + (size_t)(m0 + m) * ldy + p * NB;
                v16 v = acc[m];
                if (bias) v += b;
                if (accumulate) {
                    v16 old;
                    memcpy(&old, out, sizeof old);
                    v += old;
                }
                memcpy(out, &v, sizeof v);
            }
        }
    }
}

/* out[m] = (x[m] * rsqrt(mean(x[m]^2) + eps)) * w */
static void rms_norm(int M, int H, const float *x, const float *w, float eps, float *out) {
    for (int m = 0; m < M; m++) {
        const float *r = x + (size_t)m * H;
        float *o = out + (size_t)m * H;
        float ss = 0.0f;
        int i = 0;
        if (H % NB == 0) {
            v16 acc = {0};
            for (; i < H; i += NB) {
                v16 v;
                memcpy(&v, r + i, sizeof v);
                acc += v * v;
            }
            for (int j = 0; j < NB; j++) ss += acc[j];
        } else {
            for (; i < H; i++) ss += r[i] * r[i];
        }
        float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (i = 0; i < H; i++) o[i] = (r[i] * inv) * w[i];
    }
}

/* RoPE on adjacent (even, odd) pairs: (a + ib) * (c + id), cis = [positions][D/2][2]. */
static void rope(float *v, int n_heads, int D, const float *cis_row) {
    for (int h = 0; h < n_heads; h++) {
        float *x = v + (size_t)h * D;
        for (int i = 0; i < D / 2; i++) {
            float a = x[2 * i], b = x[2 * i + 1], c = cis_row[2 * i], d = cis_row[2 * i + 1];
            x[2 * i] = a * c - b * d;
            x[2 * i + 1] = a * d + b * c;
        }
    }
}

static inline v16 blend(v16i mask, v16 a, v16 b) { /* mask ? a : b, lane by lane */
    v16i r = ((v16i)a & mask) | ((v16i)b & ~mask);
    return (v16)r;
}

/* exp of 16 lanes (Cephes' expf: range reduction by ln 2, degree-6 polynomial, 2^n from the exponent
 * bits); within ~1 ulp of expf over [-87.3, 88.7], inputs clamped to that range. glibc's expf is scalar
 * (~10 ns a call), which made SiLU and softmax half of a step. */
static inline v16 vexp(v16 x) {
    const v16 hi = {0}, lo = {0};
    v16 h = hi + 88.3762626647949f, l = lo + -87.3365478515625f;
    x = blend(x > h, h, x);
    x = blend(x < l, l, x);
    v16 t = x * 1.44269504088896341f + 0.5f;
    v16i n = __builtin_convertvector(t, v16i);
    n += (v16i)(t < __builtin_convertvector(n, v16)); /* truncation -> floor: minus 1 where it rounded up */
    v16 fn = __builtin_convertvector(n, v16);
    v16 r = x - fn * 0.693359375f - fn * -2.12194440e-4f;
    v16 p = 1.9875691500E-4f * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    v16i e = (n + 127) << 23;
    return p * (v16)e;
}

/* v[i] = exp(v[i] - sub) for i < n; returns the sum. */
static float exp_sub_sum(float *v, int n, float sub) {
    v16 acc = {0};
    int i = 0;
    for (; i + NB <= n; i += NB) {
        v16 a;
        memcpy(&a, v + i, sizeof a);
        a = vexp(a - sub);
        memcpy(v + i, &a, sizeof a);
        acc += a;
    }
    float sum = 0.0f;
    for (int j = 0; j < NB; j++) sum += acc[j];
    for (; i < n; i++) {
        v[i] = expf(v[i] - sub);
        sum += v[i];
    }
    return sum;
}

/* a[i] = silu(g[i]) * u[i] = (g / (1 + exp(-g))) * u */
static void silu_mul(int n, const float *g, const float *u, float *a) {
    int i = 0;
    for (; i + NB <= n; i += NB) {
        v16 gv, uv;
        memcpy(&gv, g + i, sizeof gv);
        memcpy(&uv, u + i, sizeof uv);
        v16 r = (gv / (1.0f + vexp(-gv))) * uv;
        memcpy(a + i, &r, sizeof r);
    }
    for (; i < n; i++) a[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}

/* Sum of 16 lanes as a tree (a scalar chain of 15 adds made attention scores 3x slower). */
#if defined(__clang__) || __GNUC__ >= 12
static inline float hsum(v16 a) {
    v8 b = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 c = __builtin_shufflevector(b, b, 0, 1, 2, 3) + __builtin_shufflevector(b, b, 4, 5, 6, 7);
    return (c[0] + c[2]) + (c[1] + c[3]);
}
#else /* GCC < 12 has no __builtin_shufflevector */
static inline float hsum(v16 a) {
    v8 lo, hi;
    memcpy(&lo, &a, sizeof lo);
    memcpy(&hi, (const char *)&a + sizeof lo, sizeof hi);
    v8 b = lo + hi;
    v4 l4, h4;
    memcpy(&l4, &b, sizeof l4);
    memcpy(&h4, (const char *)&b + sizeof l4, sizeof h4);
    v4 c = l4 + h4;
    return (c[0] + c[2]) + (c[1] + c[3]);
}
#endif

enum { MAX_CHUNKS = 16 }; /* head_dim up to 256 */

/* One query head of one row over positions 0..p: o = softmax(q . K) V, K and V read straight from the
 * pool's blocks. ``layer_off``: floats from a block's start to this layer's first slot; ``k_off`` /
 * ``v_off``: to this head's K / V inside a slot. Inlined with D constant (64, 128) so q and the output
 * stay in registers. */
static inline __attribute__((always_inline)) void attend(const float *qv, float *o, float *s, int p,
                                                         const float *pool, const int32_t *tbl, size_t block_stride,
                                                         size_t layer_off, int bs, size_t slot_stride, size_t k_off,
                                                         size_t v_off, const int D) {
    const int C = D / NB;
    v16 qr[MAX_CHUNKS];
    for (int c = 0; c < C; c++) memcpy(&qr[c], qv + c * NB, sizeof qr[c]);
    for (int t0 = 0, b = 0; t0 <= p; t0 += bs, b++) {
        const float *slot = pool + (size_t)tbl[b] * block_stride + layer_off + k_off;
        const int end = p + 1 - t0 < bs ? p + 1 - t0 : bs;
        for (int j = 0; j < end; j++, slot += slot_stride) {
            v16 a = {0}, a2 = {0};
            int c = 0;
            for (; c + 1 < C; c += 2) {
                v16 k0, k1;
                memcpy(&k0, slot + c * NB, sizeof k0);
                memcpy(&k1, slot + (c + 1) * NB, sizeof k1);
                a += qr[c] * k0;
                a2 += qr[c + 1] * k1;
            }
            if (c < C) {
                v16 k0;
                memcpy(&k0, slot + c * NB, sizeof k0);
                a += qr[c] * k0;
            }
            s[t0 + j] = hsum(a + a2);
        }
    }
    float mx = -INFINITY;
    for (int t = 0; t <= p; t++) mx = s[t] > mx ? s[t] : mx;
    const float inv = 1.0f / exp_sub_sum(s, p + 1, mx);
    for (int t = 0; t <= p; t++) s[t] *= inv;
    v16 acc[MAX_CHUNKS];
    for (int c = 0; c < C; c++) acc[c] = (v16){0};
    for (int t0 = 0, b = 0; t0 <= p; t0 += bs, b++) {
        const float *slot = pool + (size_t)tbl[b] * block_stride + layer_off + v_off;
        const int end = p + 1 - t0 < bs ? p + 1 - t0 : bs;
        for (int j = 0; j < end; j++, slot += slot_stride) {
            const float pt = s[t0 + j];
            for (int c = 0; c < C; c++) {
                v16 v;
                memcpy(&v, slot + c * NB, sizeof v);
                acc[c] += pt * v;
            }
        }
    }
    for (int c = 0; c < C; c++) memcpy(o + c * NB, &acc[c], sizeof acc[c]);
}

/* ---- worker threads: a step's matmuls split by panels, its attention by rows.
 * Workers spin for a while between jobs (a step publishes ~5 jobs a layer, microseconds apart), then sleep
 * on a condition variable. One caller at a time per pool (the engine's step thread). */
typedef void (*job_fn)(void *arg, int part, int parts);

typedef struct drt_pool {
    int workers; /* threads besides the caller */
    pthread_t *th;
    struct worker_arg *args;
    atomic_uint gen; /* bumped to publish a job */
    atomic_int remaining;
    atomic_int stop;
    atomic_int sleepers;
    job_fn fn;
    void *arg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} drt_pool;

struct worker_arg {
    drt_pool *p;
    int part;
};

enum { SPIN_US = 200 };

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static void *worker_main(void *a) {
    struct worker_arg *wa = a;
    drt_pool *p = wa->p;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        double t0 = now_us();
        for (int spins = 1; (g = atomic_load(&p->gen)) == seen && !atomic_load(&p->stop); spins++) {
            cpu_relax();
            if (spins % 1024 == 0 && now_us() - t0 > SPIN_US) {
                pthread_mutex_lock(&p->mu);
                atomic_fetch_add(&p->sleepers, 1);
                while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
                atomic_fetch_sub(&p->sleepers, 1);
                pthread_mutex_unlock(&p->mu);
            }
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = g;
        p->fn(p->arg, wa->part, p->workers + 1);
        atomic_fetch_sub(&p->remaining, 1);
    }
}

void drt_pool_destroy(drt_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->workers; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->th);
    free(p->args);
    free(p);
}

/* A pool for ``threads`` threads in all (the caller included); NULL for 1 thread or on failure. */
drt_pool *drt_pool_create(int threads) {
    if (threads <= 1) return NULL;
    drt_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->th = calloc((size_t)threads - 1, sizeof *p->th);
    p->args = calloc((size_t)threads - 1, sizeof *p->args);
    if (!p->th || !p->args || pthread_mutex_init(&p->mu, NULL) || pthread_cond_init(&p->cv, NULL)) {
        free(p->th);
        free(p->args);
        free(p);
        return NULL;
    }
    for (int i = 0; i < threads - 1; i++) {
        p->args[i] = (struct worker_arg){p, i + 1};
        if (pthread_create(&p->th[i], NULL, worker_main, &p->args[i])) break;
        p->workers = i + 1;
    }
    if (p->workers == 0) {
        drt_pool_destroy(p);
        return NULL;
    }
    return p;
}

static void pool_run(drt_pool *p, job_fn fn, void *arg) {
    if (!p) {
        fn(arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->remaining, p->workers);
    atomic_fetch_add(&p->gen, 1); /* publishes fn / arg */
    if (atomic_load(&p->sleepers)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    fn(arg, 0, p->workers + 1);
    while (atomic_load(&p->remaining) > 0) cpu_relax();
}

typedef struct {
    int M, K, ldx, ldy, accumulate, panels;
    const float *x, *wp, *bias;
    float *y;
} lin_job;

static void lin_part(void *a, int part, int parts) {
    const lin_job *j = a;
    linear_panels(j->M, j->K, j->x, j->ldx, j->wp, j->bias, j->y, j->ldy, j->accumulate,
                  (int)((long)j->panels * part / parts), (int)((long)j->panels * (part + 1) / parts));
}

/* y[m, :N] = x[m, :K] @ W^T (+ b) (+ y if accumulate), split by panels over the pool's threads. */
static void linear(drt_pool *pool, int M, int N, int K, const float *x, int ldx, const float *wp,
                   const float *bias, float *y, int ldy, int accumulate) {
    lin_job j = {M, K, ldx, ldy, accumulate, N / NB, x, wp, bias, y};
    /* Tiny matmuls are not worth a hand-off. */
    pool_run((long)M * N * K >= (1L << 16) ? pool : NULL, lin_part, &j);
}

/* Rows of one layer's attention: RoPE, the K/V write into the pool, attention over the row's blocks. */
typedef struct {
    const drt_model *m;
    int n, nb, l, T;
    const int32_t *pos, *tables;
    float *pool, *qkv, *attn, *sc;
    const float *cis;
} attn_job;

static void attn_part(void *a, int part, int parts) {
    const attn_job *j = a;
    const drt_model *m = j->m;
    const int H = m->heads, KV = m->kv_heads, D = m->head_dim, L = m->layers, bs = m->block_size, G = H / KV;
    const int QKVN = (H + 2 * KV) * D, l = j->l;
    const size_t tok_stride = (size_t)2 * KV * D;
    const size_t block_stride = (size_t)L * bs * tok_stride, layer_off = (size_t)l * bs * tok_stride;
    float *sc = j->sc + (size_t)part * H * j->T; /* this thread's scores */
    for (int r = part; r < j->n; r += parts) {
        float *q = j->qkv + (size_t)r * QKVN;
        const int p = j->pos[r];
        rope(q, H + KV, D, j->cis + (size_t)p * D); /* q heads then k heads, contiguous */
        const int32_t *tbl = j->tables + (size_t)r * j->nb;
        float *slot = j->pool + (size_t)tbl[p / bs] * block_stride + layer_off + (size_t)(p % bs) * tok_stride;
        memcpy(slot, q + (size_t)H * D, tok_stride * sizeof(float)); /* K then V of every kv head */
        for (int qh = 0; qh < H; qh++) {
            const size_t k_off = (size_t)(qh / G) * D, v_off = (size_t)(KV + qh / G) * D;
            const float *qv = q + (size_t)qh * D;
            float *o = j->attn + (size_t)r * H * D + (size_t)qh * D;
            if (D == 64)
                attend(qv, o, sc, p, j->pool, tbl, block_stride, layer_off, bs, tok_stride, k_off, v_off, 64);
            else if (D == 128)
                attend(qv, o, sc, p, j->pool, tbl, block_stride, layer_off, bs, tok_stride, k_off, v_off, 128);
            else
                attend(qv, o, sc, p, j->pool, tbl, block_stride, layer_off, bs, tok_stride, k_off, v_off, D);
        }
    }
}

/* What this build compiled for (native.py reports it in every bench): the widest vector unit the compiler
 * was allowed to use, in bits. v16 is one register at 512; at 256 it is two, and the 8-row tile would need
 * 16 accumulators + the weight: more than AVX2's 16 registers (see linear_panels). */
int drt_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX__)
    return 256;
#else
    return 128;
#endif
}

/* Per-op time of the decode steps, only in a build with -DDRT_PROFILE (bench/reference_engine.py --profile):
 * microseconds summed over steps. */
enum { P_EMBED, P_NORM, P_QKV, P_ATTN, P_O, P_GU, P_SILU, P_DOWN, P_HEAD, P_STEPS, P_N };
double drt_prof_us[P_N];
int drt_prof_ops(void) { return P_N; }
#ifdef DRT_PROFILE
/* CPU time of the calling thread, not wall time: on a shared host, time the thread waits for a core is not
 * the kernel's. (With worker threads it includes the caller's spin while it waits for them.) */
static double cpu_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}
#define PROF_START double prof_t = cpu_us()
#define PROF(i)                                                                                              \
    do {                                                                                                     \
        double prof_n = cpu_us();                                                                            \
        drt_prof_us[i] += prof_n - prof_t;                                                                   \
        prof_t = prof_n;                                                                                     \
    } while (0)
#else
#define PROF_START
#define PROF(i)
#endif

/* One decode step of n rows; ``pool_threads`` from drt_pool_create (NULL: the caller's thread only).
 * Returns 0, -1 when out of memory, -2 when a position is past the RoPE table. */
int drt_decode(const drt_model *m, drt_pool *threads, int n, const int32_t *ids, const int32_t *pos,
               const int32_t *tables, int nb, float *pool, const float *cis, int rope_len, float *logits) {
    const int Hd = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, I = m->inter, L = m->layers;
    const int QKVN = (H + 2 * KV) * D, parts = threads ? threads->workers + 1 : 1;
    int T = 0;
    for (int r = 0; r < n; r++) {
        if (pos[r] >= rope_len || pos[r] < 0) return -2;
        if (pos[r] + 1 > T) T = pos[r] + 1;
    }
    size_t need = (size_t)n * Hd * 2 + (size_t)n * QKVN + (size_t)n * H * D + (size_t)n * 2 * I + (size_t)n * I +
                  (size_t)parts * H * T;
    float *buf = malloc(need * sizeof(float));
    if (!buf) return -1;
    float *x = buf, *h = x + (size_t)n * Hd, *qkv = h + (size_t)n * Hd, *attn = qkv + (size_t)n * QKVN,
          *gu = attn + (size_t)n * H * D, *act = gu + (size_t)n * 2 * I, *sc = act + (size_t)n * I;

    PROF_START;
    for (int r = 0; r < n; r++) memcpy(x + (size_t)r * Hd, m->embed + (size_t)ids[r] * Hd, Hd * sizeof(float));
    PROF(P_EMBED);

    for (int l = 0; l < L; l++) {
        const float *const *w = m->lw + (size_t)l * LAYER_PTRS;
        rms_norm(n, Hd, x, w[LN1], m->eps, h);
        PROF(P_NORM);
        linear(threads, n, QKVN, Hd, h, Hd, w[QKV], w[QKV_B], qkv, QKVN, 0);
        PROF(P_QKV);
        attn_job aj = {m, n, nb, l, T, pos, tables, pool, qkv, attn, sc, cis};
        pool_run(n > 1 ? threads : NULL, attn_part, &aj);
        PROF(P_ATTN);
        linear(threads, n, Hd, H * D, attn, H * D, w[O], w[O_B], x, Hd, 1);
        PROF(P_O);
        rms_norm(n, Hd, x, w[LN2], m->eps, h);
        PROF(P_NORM);
        linear(threads, n, 2 * I, Hd, h, Hd, w[GU], w[GU_B], gu, 2 * I, 0);
        PROF(P_GU);
        for (int r = 0; r < n; r++) silu_mul(I, gu + (size_t)r * 2 * I, gu + (size_t)r * 2 * I + I, act + (size_t)r * I);
        PROF(P_SILU);
        linear(threads, n, Hd, I, act, I, w[DOWN], w[DOWN_B], x, Hd, 1);
        PROF(P_DOWN);
    }
    rms_norm(n, Hd, x, m->norm, m->eps, h);
    PROF(P_NORM);
    linear(threads, n, m->vocab, Hd, h, Hd, m->head, NULL, logits, m->vocab, 0);
    PROF(P_HEAD);
#ifdef DRT_PROFILE
    drt_prof_us[P_STEPS] += 1;
#endif
    free(buf);
    return 0;
}
