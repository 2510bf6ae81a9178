/* Softmax statistics of logit rows in one scan and one exponentiation pass, for the CPU path
 * of headlab's attention statistics (loaded with ctypes by kernels/native.py).
 *
 * Rows are base-2 logits s [rows, n], contiguous. For each row:
 *   1. scan:  the row maximum and, for k >= 1, the k largest logits and their key indices in
 *             descending order (ties keep the earlier key).
 *   2. exp:   s is overwritten with e = 2^(s - max), and spread = sum_j e_j (s_j - max).
 * Hidden keys (logit = -FLT_MAX, -3.4e38) get e = 0 exactly.
 *
 * Written with GCC vector extensions (gcc, clang) so that it compiles to AVX-512, AVX2, SSE or
 * NEON, whatever the compiler is told (-DLANES=16 for 64-byte vectors); no intrinsics and no fast-math (one build gives the same
 * results every run; builds with and without FMA differ in the last bits).
 */
#include <stdint.h>
#include <string.h>

#ifndef LANES
#define LANES 8 /* floats per vector: 8 (32 bytes, AVX2) by default, 16 (64 bytes) for AVX-512 builds */
#endif
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));
typedef int64_t vq __attribute__((vector_size(4 * LANES)));

static inline vf load(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
static inline void store(float *p, vf x) { memcpy(p, &x, sizeof x); }
static inline vf splat(float a) { vf x; for (int t = 0; t < LANES; t++) x[t] = a; return x; }
static inline int any(vi m) {
    vq w = (vq)m;
    int64_t bits = 0;
    for (int t = 0; t < LANES / 2; t++) bits |= w[t];
    return bits != 0;
}
static inline vf pick(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* Keep vals/idx sorted descending with `filled` entries (capacity k). */
static void insert(float x, int64_t j, int k, int *filled, float *vals, int64_t *idx) {
    int pos = *filled < k ? (*filled)++ : k - 1;
    while (pos > 0 && vals[pos - 1] < x) {
        vals[pos] = vals[pos - 1];
        idx[pos] = idx[pos - 1];
        pos--;
    }
    vals[pos] = x;
    idx[pos] = j;
}

#define RUN (8 * LANES) /* logits per run: 8 vectors */

/* Maxima of the RUN interleaved lanes of row[0:n] (lane t holds row[t], row[t + RUN], ...);
 * lanes with no element stay -inf. */
static void lane_maxima(const float *row, int64_t n, float *lanes) {
    vf acc[8];
    for (int b = 0; b < 8; b++) acc[b] = splat(-__builtin_inff());
    int64_t j = 0;
    for (; j + RUN <= n; j += RUN)
        for (int b = 0; b < 8; b++) {
            vf x = load(row + j + b * LANES);
            acc[b] = pick(x > acc[b], x, acc[b]);
        }
    memcpy(lanes, acc, sizeof acc);
    for (int t = 0; j + t < n; t++)
        if (row[j + t] > lanes[t]) lanes[t] = row[j + t];
}

/* Insert the logits of row[start:stop] that reach thr and beat the current k-th best; return
 * the updated threshold. */
static float take_candidates(const float *row, int64_t start, int64_t stop, float thr, int k,
                             int *filled, float *vals, int64_t *idx) {
    for (int64_t j = start; j < stop; j++)
        if (row[j] >= thr && (*filled < k || row[j] > vals[k - 1])) {
            insert(row[j], j, k, filled, vals, idx);
            if (*filled == k) thr = vals[k - 1];
        }
    return thr;
}

/* The k largest of row[0:n] (1 <= k <= n) into vals/idx, descending, ties to the earlier key.
 * The k-th largest lane maximum is a lower bound of the k-th largest logit (k distinct logits
 * reach it), so one vector pass with that threshold finds the few candidates. */
static void scan_top(const float *row, int64_t n, int k, float *vals, int64_t *idx) {
    float lanes[RUN], best[8];
    int64_t unused[8];
    int filled = 0;
    lane_maxima(row, n, lanes);
    for (int t = 0; t < RUN; t++)
        if (filled < k || lanes[t] > best[k - 1]) insert(lanes[t], t, k, &filled, best, unused);
    float thr = best[k - 1];
    filled = 0;
    int64_t j = 0;
    for (; j + RUN <= n; j += RUN) {
        vf tv = splat(thr);
        vi hit = load(row + j) >= tv;
        for (int b = 1; b < 8; b++) hit |= load(row + j + b * LANES) >= tv;
        if (any(hit)) thr = take_candidates(row, j, j + RUN, thr, k, &filled, vals, idx);
    }
    take_candidates(row, j, n, thr, k, &filled, vals, idx);
}

/* 2^x for x <= 0, relative error < 1e-7; exactly 0 below -127. Round-to-nearest split
 * x = m + f, |f| <= 1/2, degree-7 Taylor polynomial of 2^f, 2^m built in the exponent bits. */
static inline vf exp2_nonpositive(vf x) {
    const vf lo = splat(-127.0f), magic = splat(12582912.0f); /* 1.5 * 2^23 rounds to integer */
    x = pick(x < lo, lo, x);
    vf m = (x + magic) - magic;
    vf f = x - m;
    const float c[8] = {1.0f, 6.931471806e-1f, 2.402265070e-1f, 5.550410866e-2f,
                        9.618129108e-3f, 1.333355815e-3f, 1.540353039e-4f, 1.525273380e-5f};
    vf p = splat(c[7]);
    for (int i = 6; i >= 0; i--) p = p * f + splat(c[i]);
    vi bits = (__builtin_convertvector(m, vi) + 127) << 23; /* 0 (the float 0) at m = -127 */
    return p * (vf)bits;
}

/* Overwrite row with 2^(row - mx); return sum_j e_j (row_j - mx). */
static float exp_and_spread(float *row, int64_t n, float mx) {
    vf acc = splat(0.0f), shift = splat(mx);
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        vf x = load(row + j) - shift;
        vf e = exp2_nonpositive(x);
        store(row + j, e);
        acc += e * x; /* hidden keys: 0 * -3.4e38 = 0 */
    }
    float spread = 0.0f;
    for (int t = 0; t < LANES; t++) spread += acc[t];
    if (j < n) { /* the tail goes through the same vector code, padded with hidden logits */
        float tail[LANES];
        for (int t = 0; t < LANES; t++) tail[t] = j + t < n ? row[j + t] : -3.4028234664e38f;
        vf x = load(tail) - shift;
        vf e = exp2_nonpositive(x);
        vf term = e * x;
        for (int t = 0; j + t < n; t++) {
            row[j + t] = e[t];
            spread += term[t];
        }
    }
    return spread;
}

/* For each of `rows` rows of length n >= 1: with k >= 1 (k <= n), the top-k logits and keys
 * into top_vals/top_idx [rows, k]; the maximum into row_max [rows]; then the row replaced by
 * 2^(s - max) and spread [rows] = sum_j e_j (s_j - max). */
void headlab_row_stats(float *s, int64_t rows, int64_t n, int k, float *row_max, float *spread,
                       float *top_vals, int64_t *top_idx) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * n;
        if (k) {
            scan_top(row, n, k, top_vals + r * k, top_idx + r * k);
            row_max[r] = top_vals[r * k];
        } else {
            float lanes[RUN];
            lane_maxima(row, n, lanes);
            row_max[r] = lanes[0];
            for (int t = 1; t < RUN; t++)
                if (lanes[t] > row_max[r]) row_max[r] = lanes[t];
        }
        spread[r] = exp_and_spread(row, n, row_max[r]);
    }
}
