/* Row-wise top-k of a float32 matrix, bit-identical to torch.topk(x, k, dim=1, largest=True) on the CPU
 * wherever torch takes its partial-sort path (k * 64 <= n; sae_pipeline/sae/native.py checks that).
 *
 * torch's CPU kernel (aten/src/ATen/native/TopKImpl.h) fills a vector of (value, index) pairs for the whole
 * row and calls libstdc++'s std::partial_sort with "a before b iff (isnan(a) && !isnan(b)) || a > b": a
 * max-heap of the first k pairs under that order (so its root is the smallest kept), every later pair that
 * beats the root replaces it, and the heap is then sorted, so the output is largest first, sorted or not.
 * Where the row's k largest values are distinct, NaN-free and no other value equals the k-th, that output
 * is simply determined (no tie to break), and `topk_row` finds it without a heap: a lower bound of the k-th
 * value from one vectorised max pass, then a scan collecting the few values that reach it. Any other row
 * (ties, NaN: largest of all, as in numpy) goes to `topk_row_exact`, which replays libstdc++'s heap
 * operations step for step (__make_heap, __adjust_heap, __push_heap, __pop_heap, __sort_heap of
 * bits/stl_heap.h), skipping a block of values that cannot beat the root at a time; ties and NaN therefore
 * come out exactly as torch orders them.
 *
 * Rows are independent and split into fixed contiguous chunks over threads, so the result does not depend
 * on the thread count.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    float v;
    int64_t i;
} elem_t;

/* comp(a, b): a is ordered before b (kept in preference to b). */
static inline int beats(float a, float b) { return (isnan(a) && !isnan(b)) || a > b; }

static void push_heap(elem_t *h, int64_t hole, int64_t top, elem_t value) {
    int64_t parent = (hole - 1) / 2;
    while (hole > top && beats(h[parent].v, value.v)) {
        h[hole] = h[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    h[hole] = value;
}

static void adjust_heap(elem_t *h, int64_t hole, int64_t len, elem_t value) {
    const int64_t top = hole;
    int64_t child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (beats(h[child].v, h[child - 1].v)) child--;
        h[hole] = h[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        h[hole] = h[child - 1];
        hole = child - 1;
    }
    push_heap(h, hole, top, value);
}

static void make_heap(elem_t *h, int64_t len) {
    if (len < 2) return;
    for (int64_t parent = (len - 2) / 2;; parent--) {
        adjust_heap(h, parent, len, h[parent]);
        if (parent == 0) return;
    }
}

/* Index of the first j in [i, n) with !(x[j] OP t) (true for NaN), or n; OP is <= (strict) or < (loose). */
#define SCAN(NAME, OP, SSE_CMP)                                                     \
    static int64_t NAME(const float *x, int64_t i, int64_t n, float t) {            \
        SIMD_SKIP(SSE_CMP)                                                          \
        while (i < n && x[i] OP t) i++;                                             \
        return i;                                                                   \
    }
#ifdef __SSE2__
#include <emmintrin.h>
/* 16 values at a time: cmpnle / cmpnlt are true for unordered (NaN) operands, as !(x <= t) is */
#define SIMD_SKIP(SSE_CMP)                                                          \
    const __m128 tt = _mm_set1_ps(t);                                               \
    while (i + 16 <= n) {                                                           \
        __m128 m = _mm_or_ps(_mm_or_ps(SSE_CMP(_mm_loadu_ps(x + i), tt),            \
                                       SSE_CMP(_mm_loadu_ps(x + i + 4), tt)),       \
                             _mm_or_ps(SSE_CMP(_mm_loadu_ps(x + i + 8), tt),        \
                                       SSE_CMP(_mm_loadu_ps(x + i + 12), tt)));     \
        if (_mm_movemask_ps(m)) break;                                              \
        i += 16;                                                                    \
    }
#else
#define SIMD_SKIP(SSE_CMP)
#endif
SCAN(next_beating, <=, _mm_cmpnle_ps) /* the values that beat t: x > t, or NaN */
SCAN(next_reaching, <, _mm_cmpnlt_ps) /* the values that reach t: x >= t, or NaN */

/* The exact replay of std::partial_sort (see the top of this file); h holds k elements. */
static void topk_row_exact(const float *x, int64_t n, int64_t k, float *vals, int64_t *idx, elem_t *h) {
    for (int64_t j = 0; j < k; j++) {
        h[j].v = x[j];
        h[j].i = j;
    }
    make_heap(h, k);
    int64_t i = k;
    while (i < n && !isnan(h[0].v)) { /* a NaN root is beaten by nothing */
        i = next_beating(x, i, n, h[0].v);
        if (i >= n) break;
        elem_t e = {x[i], i};
        adjust_heap(h, 0, k, e); /* __pop_heap(first, middle, i): the old root goes to the discarded slot i */
        i++;
    }
    for (int64_t last = k; last > 1;) { /* __sort_heap */
        last--;
        elem_t e = h[last];
        h[last] = h[0];
        adjust_heap(h, 0, last, e);
    }
    for (int64_t j = 0; j < k; j++) {
        vals[j] = h[j].v;
        idx[j] = h[j].i;
    }
}

/* The k-th largest of m >= k NaN-free values s (quickselect; s is reordered). */
static float kth_largest_f(float *s, int64_t m, int64_t k) {
    int64_t lo = 0, hi = m - 1, want = k - 1;
    while (lo < hi) {
        float p = s[lo + (hi - lo) / 2];
        int64_t a = lo, b = hi;
        while (a <= b) {
            while (s[a] > p) a++;
            while (s[b] < p) b--;
            if (a <= b) {
                float tmp = s[a];
                s[a] = s[b];
                s[b] = tmp;
                a++;
                b--;
            }
        }
        if (want <= b) hi = b;
        else if (want >= a) lo = a;
        else break;
    }
    return s[want];
}

static float kth_largest(const elem_t *c, int64_t m, int64_t k, float *s) {
    for (int64_t j = 0; j < m; j++) s[j] = c[j].v;
    return kth_largest_f(s, m, k);
}

/* A lower bound of the row's k-th largest value: split the row into g >= k groups (element j in group j % g)
 * and take each group's maximum; the k-th largest of those g maxima is reached by k distinct elements (the
 * k largest maxima), so it is <= the row's k-th largest. One vectorisable pass; with g = 4k only a few dozen
 * more values reach it. A NaN may be lost by the max (the collecting scan sees it). mx, s hold g floats. */
#define GROUPS(k) (((k) + 15) / 16 * 64) /* about 4k, a multiple of 64 */
static float lower_bound(const float *x, int64_t n, int64_t k, float *mx, int64_t g, float *s) {
    for (int64_t j = 0; j < g; j++) mx[j] = -INFINITY;
    int64_t i = 0;
    for (; i + g <= n; i += g)
        for (int64_t j = 0; j < g; j++) mx[j] = x[i + j] > mx[j] ? x[i + j] : mx[j];
    for (int64_t j = 0; i + j < n; j++) mx[j] = x[i + j] > mx[j] ? x[i + j] : mx[j];
    for (int64_t j = 0; j < g; j++) s[j] = mx[j];
    return kth_largest_f(s, g, k);
}

/* The fast path. When the k largest values of the row are distinct, none is NaN and no other value equals the
 * k-th, torch's answer is simply those k values in decreasing order with their indices (no tie to break), so
 * any selection gives it: candidates reaching a rising threshold t (a lower bound of the k-th value) are
 * collected, and the buffer is cut back to those reaching its own k-th value when it fills. Every value >=
 * the final k-th value is then in the buffer, so the conditions are checked there; a row that fails them
 * (ties, NaN) is answered by the exact replay. (The count check and the tie check of the sort each catch a
 * tie at the boundary; the first is kept for clarity.) cap >= GROUPS(k) > k; c holds cap elements, s holds
 * cap + GROUPS(k) floats. */
static void topk_row(const float *x, int64_t n, int64_t k, float *vals, int64_t *idx, elem_t *h, elem_t *c,
                     float *s, int64_t cap) {
    int64_t m = 0, i = 0;
    float t = lower_bound(x, n, k, s + cap, GROUPS(k), s);
    if (isnan(t)) goto exact;
    while (i < n) {
        i = next_reaching(x, i, n, t);
        if (i >= n) break;
        if (isnan(x[i])) goto exact;
        c[m].v = x[i];
        c[m].i = i;
        m++;
        i++;
        if (m == cap) {
            t = kth_largest(c, m, k, s);
            int64_t kept = 0;
            for (int64_t j = 0; j < m; j++)
                if (c[j].v >= t) c[kept++] = c[j];
            m = kept;
            if (m > cap / 2) goto exact; /* many ties at t */
        }
    }
    if (m < k) goto exact; /* cannot happen for NaN-free rows with n >= k; kept for safety */
    if (m > k) {
        t = kth_largest(c, m, k, s);
        int64_t kept = 0;
        for (int64_t j = 0; j < m; j++)
            if (c[j].v >= t) c[kept++] = c[j];
        m = kept;
        if (m != k) goto exact; /* another value equals the k-th */
    }
    for (int64_t a = 1; a < k; a++) { /* insertion sort, decreasing; an equal pair means a tie */
        elem_t e = c[a];
        int64_t b = a;
        while (b > 0 && c[b - 1].v < e.v) {
            c[b] = c[b - 1];
            b--;
        }
        if (b > 0 && c[b - 1].v == e.v) goto exact;
        c[b] = e;
    }
    for (int64_t j = 0; j < k; j++) {
        vals[j] = c[j].v;
        idx[j] = c[j].i;
    }
    return;
exact:
    topk_row_exact(x, n, k, vals, idx, h);
}

typedef struct {
    const float *x;
    int64_t row_stride, n, k, row0, row1;
    float *vals;
    int64_t *idx;
    int status;
} job_t;

static void *run_rows(void *arg) {
    job_t *job = (job_t *)arg;
    const int64_t k = job->k, cap = GROUPS(k) > 256 ? GROUPS(k) : 256;
    elem_t *h = (elem_t *)malloc(sizeof(elem_t) * (size_t)(k + cap));
    float *s = (float *)malloc(sizeof(float) * (size_t)(cap + GROUPS(k)));
    if (!h || !s) {
        free(h);
        free(s);
        job->status = -1;
        return NULL;
    }
    for (int64_t r = job->row0; r < job->row1; r++)
        topk_row(job->x + r * job->row_stride, job->n, k, job->vals + r * k, job->idx + r * k, h, h + k, s,
                 cap);
    free(h);
    free(s);
    job->status = 0;
    return NULL;
}

/* x: rows x n floats, row r at x + r * row_stride (unit stride along the row); vals, idx: rows x k,
 * contiguous.
 * Returns 0, or -1 when memory or a thread could not be had (the caller then uses torch.topk). */
int sae_topk_f32(const float *x, int64_t rows, int64_t row_stride, int64_t n, int64_t k, float *vals,
                 int64_t *idx, int threads) {
    if (k < 1 || k > n) return -1;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    if (threads > 64) threads = 64;
    job_t jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){x, row_stride, n, k, rows * t / threads, rows * (t + 1) / threads, vals, idx, -1};
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&tids[t], NULL, run_rows, &jobs[t]) == 0;
    run_rows(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(tids[t], NULL);
        } else {
            run_rows(&jobs[t]); /* no thread to be had: do its rows here (same result) */
        }
        if (jobs[t].status != 0) status = -1;
    }
    return status;
}
