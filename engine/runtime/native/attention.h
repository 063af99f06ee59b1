/* Template: causal grouped-query attention of T new queries over one sequence's cached keys and values, float32.
 *
 * q:    (T, n_heads, head_dim), query t at row stride ldq (floats), head h at h * head_dim
 * k, v: (n_kv_heads, L, head_dim) with L >= start + T, kv head stride ldh, position stride ldp (floats)
 * out:  (T, n_heads * head_dim), row stride ldo
 * Query t sits at absolute position start + t and sees keys 0 .. start + t; query head h reads kv head
 * h / (n_heads / n_kv_heads) (GQA: never repeated in memory).
 *
 * Flash-attention style: the keys are visited in blocks of ATT_BK with an online softmax (running max, running sum,
 * rescaled output), so memory is O(rows x block), never (heads x T x L). Work items are (kv head, block of queries);
 * the rows of an item are its queries x the group of query heads sharing the kv head, taken ATT_RB at a time so each
 * key and value row is loaded once for all of them. Scores are (q . k) * scale in float32, as the NumPy reference.
 *
 * probs (optional, for traces): (n_heads, T, L) float32 post-softmax probabilities, row stride L = start + T, exact
 * zeros above the diagonal. A second pass over the keys recomputes each score and divides its exp by the row's final
 * sum; the output is computed exactly as without it, so a traced forward gives the same bits as an untraced one.
 *
 * A row's bits never depend on the rows computed beside it (a verification step of k + 1 queries gives each the bits
 * of its own decode step): att_rows is compiled once per row count, and the compiler may fuse a scalar a * b + c into
 * one rounding (an FMA) in one copy and not in another, so every scalar multiply-add here is an explicit sf_fmadd. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define ATT_BK 64       /* keys per block */
#define ATT_RB 8        /* query rows sharing each key/value load */
#define ATT_ITEM_ROWS 64 /* rows (queries x group) per work item */
#define ATT_DMAX 512
#define ATT_PV_CHUNKS 4 /* output vectors of one row kept in registers while its p . v sums over a key block */

typedef struct {
    const float *q;
    ptrdiff_t ldq, T, n_heads, head_dim;
    const float *k, *v;
    ptrdiff_t ldh, ldp, n_kv, start;
    float scale;
    float *out;
    ptrdiff_t ldo, queries_per_item, query_blocks;
    float *probs; /* NULL, or (n_heads, T, start + T) */
} att_job;

/* probs[head, t, :] of one row from its final running max m and sum l: exp(score - m) / l, zeros past pos. */
TARGET static void att_probs(const att_job *a, const float *kbase, const float *q, ptrdiff_t t, ptrdiff_t head,
                             ptrdiff_t pos, float m, float l)
{
    const ptrdiff_t D = a->head_dim, Dv = D - D % VL, L = a->start + a->T;
    float *row = a->probs + (head * a->T + t) * L;
    float buf[ATT_BK];
    const float inv = 1.0f / l;
    for (ptrdiff_t j0 = 0; j0 <= pos; j0 += ATT_BK) {
        ptrdiff_t nj = pos + 1 - j0 < ATT_BK ? pos + 1 - j0 : ATT_BK;
        for (ptrdiff_t j = 0; j < ATT_BK; j++) {
            if (j >= nj) { buf[j] = -INFINITY; continue; }
            const float *kr = kbase + (j0 + j) * a->ldp;
            vf dot = vf_zero();
            for (ptrdiff_t d = 0; d < Dv; d += VL) dot = vf_fmadd(vf_load(q + d), vf_load(kr + d), dot);
            float sum = vf_sum(dot);
            for (ptrdiff_t d = Dv; d < D; d++) sum = sf_fmadd(q[d], kr[d], sum);
            buf[j] = sum * a->scale;
        }
        for (ptrdiff_t j = 0; j < ATT_BK; j += VL) vf_store(&buf[j], vf_exp(vf_add(vf_load(&buf[j]), vf_set1(-m))));
        for (ptrdiff_t j = 0; j < nj; j++) row[j0 + j] = buf[j] * inv;
    }
    for (ptrdiff_t j = pos + 1; j < L; j++) row[j] = 0.0f;
}

/* ATT_RB (or fewer, rb: a constant after inlining) rows of one kv head: row r is query t[r] of head head[r]. */
TARGET INLINE void att_rows(const att_job *a, ptrdiff_t kv, const ptrdiff_t *t, const ptrdiff_t *head, const int rb)
{
    const ptrdiff_t D = a->head_dim, Dv = D - D % VL;
    const float *q[ATT_RB];
    float *o[ATT_RB];
    ptrdiff_t pos[ATT_RB], limit = 0;
    float m[ATT_RB], l[ATT_RB];
    float acc[ATT_RB][ATT_DMAX];
    float s[ATT_RB][ATT_BK];
    for (int r = 0; r < rb; r++) {
        q[r] = a->q + t[r] * a->ldq + head[r] * D;
        o[r] = a->out + t[r] * a->ldo + head[r] * D;
        pos[r] = a->start + t[r];
        if (pos[r] + 1 > limit) limit = pos[r] + 1;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        memset(acc[r], 0, (size_t)D * sizeof(float));
    }
    const float *kbase = a->k + kv * a->ldh, *vbase = a->v + kv * a->ldh;
    for (ptrdiff_t j0 = 0; j0 < limit; j0 += ATT_BK) {
        ptrdiff_t nj = limit - j0 < ATT_BK ? limit - j0 : ATT_BK;
        for (ptrdiff_t j = 0; j < nj; j++) { /* scores: one key row against every row */
            const float *kr = kbase + (j0 + j) * a->ldp;
            vf dot[ATT_RB];
#pragma GCC unroll 8
            for (int r = 0; r < rb; r++) dot[r] = vf_zero();
            for (ptrdiff_t d = 0; d < Dv; d += VL) {
                vf kv_ = vf_load(kr + d);
#pragma GCC unroll 8
                for (int r = 0; r < rb; r++) dot[r] = vf_fmadd(vf_load(q[r] + d), kv_, dot[r]);
            }
#pragma GCC unroll 8
            for (int r = 0; r < rb; r++) {
                float sum = vf_sum(dot[r]);
                for (ptrdiff_t d = Dv; d < D; d++) sum = sf_fmadd(q[r][d], kr[d], sum);
                s[r][j] = j0 + j <= pos[r] ? sum * a->scale : -INFINITY;
            }
        }
        for (int r = 0; r < rb; r++) { /* online softmax: new max, rescale what was summed so far */
            for (ptrdiff_t j = nj; j < ATT_BK; j++) s[r][j] = -INFINITY;
            vf vmax = vf_load(&s[r][0]);
            for (ptrdiff_t j = VL; j < ATT_BK; j += VL) vmax = vf_max(vmax, vf_load(&s[r][j]));
            float mx = vf_hmax(vmax) > m[r] ? vf_hmax(vmax) : m[r];
            float alpha = expf(m[r] - mx); /* 0 on the first block (m = -inf) */
            m[r] = mx;
            vf total = vf_zero(), shift = vf_set1(-mx);
            for (ptrdiff_t j = 0; j < ATT_BK; j += VL) {
                vf p = vf_exp(vf_add(vf_load(&s[r][j]), shift));
                vf_store(&s[r][j], p);
                total = vf_add(total, p);
            }
            l[r] = sf_fmadd(l[r], alpha, vf_sum(total));
            if (alpha != 1.0f) {
                vf al = vf_set1(alpha);
                for (ptrdiff_t d = 0; d < Dv; d += VL) vf_store(acc[r] + d, vf_mul(vf_load(acc[r] + d), al));
                for (ptrdiff_t d = Dv; d < D; d++) acc[r][d] *= alpha;
            }
        }
        /* acc += p . v: per row, ATT_PV_CHUNKS vectors of its output stay in registers over the block's keys (the
         * block's value rows, 16 KB at head_dim 64, are re-read from L1 for each row). */
        for (int r = 0; r < rb; r++) {
            ptrdiff_t d0 = 0;
            for (; d0 + ATT_PV_CHUNKS * VL <= Dv; d0 += ATT_PV_CHUNKS * VL) { /* constant trip counts: registers */
                vf o4[ATT_PV_CHUNKS];
                for (int c = 0; c < ATT_PV_CHUNKS; c++) o4[c] = vf_load(acc[r] + d0 + c * VL);
                const float *vr = vbase + j0 * a->ldp + d0;
                for (ptrdiff_t j = 0; j < nj; j++, vr += a->ldp) {
                    vf p = vf_set1(s[r][j]);
                    for (int c = 0; c < ATT_PV_CHUNKS; c++) o4[c] = vf_fmadd(p, vf_load(vr + c * VL), o4[c]);
                }
                for (int c = 0; c < ATT_PV_CHUNKS; c++) vf_store(acc[r] + d0 + c * VL, o4[c]);
            }
            for (; d0 < Dv; d0 += VL) { /* what is left of head_dim, one vector at a time */
                vf o = vf_load(acc[r] + d0);
                const float *vr = vbase + j0 * a->ldp + d0;
                for (ptrdiff_t j = 0; j < nj; j++, vr += a->ldp) o = vf_fmadd(vf_set1(s[r][j]), vf_load(vr), o);
                vf_store(acc[r] + d0, o);
            }
            for (ptrdiff_t d = Dv; d < D; d++)
                for (ptrdiff_t j = 0; j < nj; j++) acc[r][d] = sf_fmadd(s[r][j], vbase[(j0 + j) * a->ldp + d], acc[r][d]);
        }
    }
    for (int r = 0; r < rb; r++) {
        float inv = 1.0f / l[r];
        for (ptrdiff_t d = 0; d < D; d++) o[r][d] = acc[r][d] * inv;
        if (a->probs) att_probs(a, kbase, q[r], t[r], head[r], pos[r], m[r], l[r]);
    }
}

/* att_rows compiled for each row count. */
TARGET static void att_rows_any(const att_job *a, ptrdiff_t kv, const ptrdiff_t *t, const ptrdiff_t *head, int rb)
{
    switch (rb) {
    case 1: att_rows(a, kv, t, head, 1); break;
    case 2: att_rows(a, kv, t, head, 2); break;
    case 3: att_rows(a, kv, t, head, 3); break;
    case 4: att_rows(a, kv, t, head, 4); break;
#if ATT_RB > 4
    case 5: att_rows(a, kv, t, head, 5); break;
    case 6: att_rows(a, kv, t, head, 6); break;
    case 7: att_rows(a, kv, t, head, 7); break;
    case 8: att_rows(a, kv, t, head, 8); break;
#endif
    default: abort();
    }
}

/* Item i: kv head i / query_blocks, queries of block i % query_blocks, every head of the kv head's group. */
TARGET static void att_item(void *arg, ptrdiff_t i)
{
    const att_job *a = (const att_job *)arg;
    ptrdiff_t kv = i / a->query_blocks, t0 = (i % a->query_blocks) * a->queries_per_item;
    ptrdiff_t t1 = t0 + a->queries_per_item < a->T ? t0 + a->queries_per_item : a->T;
    ptrdiff_t group = a->n_heads / a->n_kv;
    ptrdiff_t t[ATT_RB], head[ATT_RB];
    int rb = 0;
    for (ptrdiff_t tq = t0; tq < t1; tq++)
        for (ptrdiff_t g = 0; g < group; g++) {
            t[rb] = tq;
            head[rb] = kv * group + g;
            if (++rb == ATT_RB) {
                att_rows_any(a, kv, t, head, rb);
                rb = 0;
            }
        }
    if (rb) att_rows_any(a, kv, t, head, rb);
}

void VARIANT(tl_attention)(const float *q, ptrdiff_t ldq, ptrdiff_t T, ptrdiff_t n_heads, ptrdiff_t head_dim,
                           const float *k, const float *v, ptrdiff_t ldh, ptrdiff_t ldp, ptrdiff_t n_kv_heads,
                           ptrdiff_t start, float scale, float *out, ptrdiff_t ldo, float *probs, int threads)
{
    if (T <= 0) return;
    if (head_dim > ATT_DMAX || n_kv_heads <= 0 || n_heads % n_kv_heads) abort(); /* the caller checks these */
    ptrdiff_t group = n_heads / n_kv_heads;
    ptrdiff_t per_item = ATT_ITEM_ROWS / group > 0 ? ATT_ITEM_ROWS / group : 1;
    att_job a = {q, ldq, T, n_heads, head_dim, k, v, ldh, ldp, n_kv_heads, start, scale, out, ldo, per_item,
                 (T + per_item - 1) / per_item, probs};
    tl_parallel(att_item, &a, n_kv_heads * a.query_blocks, threads);
}

/* Many sequences of one step in one call (a batched decode, a prompt chunk beside decoding rows). Each sequence s has
 * count[s] new rows at row[s] of qkv, each row [q: n_heads x D | k: n_kv x D | v: n_kv x D] (already rotated), at
 * positions start[s]..; its cache holds every layer, k_cache[s] / v_cache[s]: (layers, n_kv, capacity[s], D). The
 * new keys and values are stored in the caches at `layer`, then every (sequence, kv head, block of queries) is a work
 * item of att_item, so one pool job runs the whole step's attention with the arithmetic of tl_attention: each
 * sequence's output is the same bits as from its own call. out: (rows, n_heads x D) at stride ldo. */
typedef struct {
    att_job *jobs;
    ptrdiff_t *first_item; /* n_seq + 1 prefix sums of the items of each sequence */
    ptrdiff_t n_seq;
} att_seqs_job;

TARGET static void att_seqs_item(void *arg, ptrdiff_t i)
{
    const att_seqs_job *a = (const att_seqs_job *)arg;
    ptrdiff_t lo = 0, hi = a->n_seq - 1; /* the sequence whose items hold i */
    while (lo < hi) {
        ptrdiff_t mid = (lo + hi + 1) / 2;
        if (a->first_item[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    att_item(&a->jobs[lo], i - a->first_item[lo]);
}

void VARIANT(tl_attention_seqs)(const float *qkv, ptrdiff_t ld_qkv, ptrdiff_t n_heads, ptrdiff_t n_kv_heads,
                                ptrdiff_t head_dim, ptrdiff_t n_seq, const long long *row, const long long *count,
                                const long long *start, float *const *k_cache, float *const *v_cache,
                                const long long *capacity, ptrdiff_t layer, float scale, float *out, ptrdiff_t ldo,
                                int threads)
{
    if (n_seq <= 0) return;
    if (head_dim > ATT_DMAX || n_kv_heads <= 0 || n_heads % n_kv_heads) abort(); /* the caller checks these */
    const ptrdiff_t D = head_dim, group = n_heads / n_kv_heads, q_size = n_heads * D, kv_size = n_kv_heads * D;
    const ptrdiff_t per_item = ATT_ITEM_ROWS / group > 0 ? ATT_ITEM_ROWS / group : 1;
    att_job *jobs = (att_job *)malloc((size_t)n_seq * sizeof(att_job));
    ptrdiff_t *first_item = (ptrdiff_t *)malloc((size_t)(n_seq + 1) * sizeof(ptrdiff_t));
    if (!jobs || !first_item) abort();
    first_item[0] = 0;
    for (ptrdiff_t s = 0; s < n_seq; s++) {
        const ptrdiff_t ldh = (ptrdiff_t)capacity[s] * D, T = count[s];
        float *k = k_cache[s] + layer * n_kv_heads * ldh, *v = v_cache[s] + layer * n_kv_heads * ldh;
        const float *src = qkv + (ptrdiff_t)row[s] * ld_qkv;
        for (ptrdiff_t t = 0; t < T; t++) /* store the new keys and values: (T, n_kv, D) -> (n_kv, positions, D) */
            for (ptrdiff_t h = 0; h < n_kv_heads; h++) {
                memcpy(k + h * ldh + (start[s] + t) * D, src + t * ld_qkv + q_size + h * D, (size_t)D * sizeof(float));
                memcpy(v + h * ldh + (start[s] + t) * D, src + t * ld_qkv + q_size + kv_size + h * D,
                       (size_t)D * sizeof(float));
            }
        att_job j = {src, ld_qkv, T, n_heads, head_dim, k, v, ldh, D, n_kv_heads, start[s], scale,
                     out + (ptrdiff_t)row[s] * ldo, ldo, per_item, (T + per_item - 1) / per_item, NULL};
        jobs[s] = j;
        first_item[s + 1] = first_item[s] + n_kv_heads * j.query_blocks;
    }
    att_seqs_job a = {jobs, first_item, n_seq};
    tl_parallel(att_seqs_item, &a, first_item[n_seq], threads);
    free(jobs);
    free(first_item);
}
