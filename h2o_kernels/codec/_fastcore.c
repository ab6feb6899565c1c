/* h2o_kernels.codec._fastcore: the fast profile's (blob versions 1 and 3) per-tensor kernels.
 *
 * encode_planes: one pass over a uint16 [seq, heads, dim] tensor: split into hi/lo byte planes, find
 *   rows repeating an earlier row, decide hi-plane channel centering (rotate left by one bit, subtract a
 *   per-channel reference: the median of sampled rows), choose a predictor per block of each plane from
 *   byte histograms of sampled rows (order-0 entropy with the Miller-Madow correction), and apply them.
 * decode_planes: inverse predictors, un-centering and hi/lo interleave straight into a uint16 buffer.
 * zstd_frame_size: where a zstd frame stored without its frame header ends (blob version 3's payloads).
 *
 * Plain CPython C API and the buffer protocol; the heavy loops run with the GIL released. Predictor
 * ids and their transforms are those of h2o_kernels/codec/predictors.py (mod-256 byte arithmetic).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { P_RAW = 0, P_DELTA = 1, P_XOR = 2, P_PAIR = 3, P_PAIR_DELTA = 4, N_PREDICTORS = 5 };
#define MAX_CANDS N_PREDICTORS
#define MEDIAN_ROWS 64

/* ---- predictors on one block of rows [rows, C] of one plane (heads x dim = C) --------------------- */

static void pair_forward_row(uint8_t *dst, const uint8_t *src, size_t heads, size_t dim) {
    for (size_t h = 0; h < heads; h++) {
        const uint8_t *s = src + h * dim;
        uint8_t *d = dst + h * dim;
        for (size_t j = 0; j < dim; j++)
            d[j] = (j & 1) ? (uint8_t)(s[j] - s[j - 1]) : s[j];
    }
}

static void pair_inverse_row(uint8_t *row, size_t heads, size_t dim) {
    for (size_t h = 0; h < heads; h++) {
        uint8_t *r = row + h * dim;
        for (size_t j = 1; j < dim; j += 2)
            r[j] = (uint8_t)(r[j] + r[j - 1]);
    }
}

/* dst = FORWARD[pid](src) for one block; dst and src do not overlap. */
static void forward_block(int pid, uint8_t *dst, const uint8_t *src, size_t rows, size_t heads, size_t dim) {
    size_t c = heads * dim;
    if (pid == P_RAW) {
        memcpy(dst, src, rows * c);
        return;
    }
    if (pid == P_PAIR || pid == P_PAIR_DELTA) {
        for (size_t r = 0; r < rows; r++)
            pair_forward_row(dst + r * c, src + r * c, heads, dim);
        if (pid == P_PAIR)
            return;
        /* delta along rows of the pair-delta'd block, last row first so the previous row is intact */
        for (size_t r = rows; r-- > 1;)
            for (size_t i = 0; i < c; i++)
                dst[r * c + i] = (uint8_t)(dst[r * c + i] - dst[(r - 1) * c + i]);
        return;
    }
    memcpy(dst, src, c);
    for (size_t r = 1; r < rows; r++) {
        const uint8_t *cur = src + r * c, *prev = cur - c;
        uint8_t *d = dst + r * c;
        if (pid == P_DELTA)
            for (size_t i = 0; i < c; i++) d[i] = (uint8_t)(cur[i] - prev[i]);
        else
            for (size_t i = 0; i < c; i++) d[i] = (uint8_t)(cur[i] ^ prev[i]);
    }
}

/* INVERSE[pid] in place on one block. */
static void inverse_block(int pid, uint8_t *x, size_t rows, size_t heads, size_t dim) {
    size_t c = heads * dim;
    if (pid == P_RAW || rows == 0)
        return;
    if (pid == P_DELTA || pid == P_PAIR_DELTA) {
        for (size_t r = 1; r < rows; r++)
            for (size_t i = 0; i < c; i++) x[r * c + i] = (uint8_t)(x[r * c + i] + x[(r - 1) * c + i]);
    } else if (pid == P_XOR) {
        for (size_t r = 1; r < rows; r++)
            for (size_t i = 0; i < c; i++) x[r * c + i] = (uint8_t)(x[r * c + i] ^ x[(r - 1) * c + i]);
    }
    if (pid == P_PAIR || pid == P_PAIR_DELTA)
        for (size_t r = 0; r < rows; r++) pair_inverse_row(x + r * c, heads, dim);
}

/* ---- entropy estimates ---------------------------------------------------------------------------- */

#define PLOGP_TABLE 4096
static double plogp_table[PLOGP_TABLE]; /* n log2 n, filled at import */

static double plogp(uint32_t n) {
    if (n < PLOGP_TABLE)
        return plogp_table[n];
    return (double)n * log2((double)n);
}

/* Order-0 coded size in bits of a 256-bin histogram (N log N - sum c log c); *support = nonzero bins. */
static double entropy_bits(const uint32_t *hist, int *support) {
    uint32_t total = 0;
    double sum = 0.0;
    int nz = 0;
    for (int i = 0; i < 256; i++) {
        if (hist[i]) {
            total += hist[i];
            sum += plogp(hist[i]);
            nz++;
        }
    }
    if (support)
        *support = nz;
    return plogp(total) - sum;
}

/* ---- sampled rows: `count` spread over each block (from its row 1 where there is one) ------------ */

static size_t block_sample(size_t start, size_t n, size_t count, size_t *out) {
    size_t k = n < count ? n : count, lo = n > 1 ? 1 : 0, got = 0;
    for (size_t i = 0; i < k; i++) {
        size_t r = start + (k > 1 ? lo + i * (n - 1 - lo) / (k - 1) : lo);
        if (got == 0 || out[got - 1] != r)
            out[got++] = r;
    }
    return got;
}

/* ---- repeated rows ---------------------------------------------------------------------------------- */

/* A hash of up to 8 spread-out 8-byte words of a row (equal rows, equal hashes; candidates are then
   compared in full, so a weak hash only costs time). */
static uint64_t row_hash(const uint8_t *row, size_t c) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)c;
    if (c < 8) {
        for (size_t i = 0; i < c; i++) h = (h ^ row[i]) * 0x100000001B3ull;
        return h ^ (h >> 32);
    }
    size_t words = c / 8, step = words > 8 ? words / 8 : 1;
    for (size_t w = 0; w < words; w += step) {
        uint64_t v;
        memcpy(&v, row + 8 * w, 8);
        h = (h ^ v) * 0xFF51AFD7ED558CCDull;
        h ^= h >> 29;
    }
    uint64_t tail;
    memcpy(&tail, row + c - 8, 8);
    h = (h ^ tail) * 0xFF51AFD7ED558CCDull;
    return h ^ (h >> 32);
}

/* repeated[r] = 1 where row r of plane [seq, c] equals an earlier row. Returns the count, or -1 (no memory). */
static long mark_repeats(const uint8_t *plane, size_t seq, size_t c, uint8_t *repeated) {
    size_t cap = 16;
    while (cap < 2 * seq) cap <<= 1;
    int64_t *table = malloc(cap * sizeof(int64_t));
    uint64_t *hashes = malloc((seq ? seq : 1) * sizeof(uint64_t));
    if (!table || !hashes) {
        free(table);
        free(hashes);
        return -1;
    }
    for (size_t i = 0; i < cap; i++) table[i] = -1;
    long count = 0;
    for (size_t r = 0; r < seq; r++) {
        const uint8_t *row = plane + r * c;
        uint64_t h = row_hash(row, c);
        hashes[r] = h;
        size_t slot = (size_t)h & (cap - 1);
        repeated[r] = 0;
        while (table[slot] >= 0) {
            size_t j = (size_t)table[slot];
            if (hashes[j] == h && memcmp(plane + j * c, row, c) == 0) {
                repeated[r] = 1;
                break;
            }
            slot = (slot + 1) & (cap - 1);
        }
        if (repeated[r])
            count++;
        else
            table[slot] = (int64_t)r;
    }
    free(table);
    free(hashes);
    return count;
}

/* ---- predictor choice for one plane ---------------------------------------------------------------- */

typedef struct {
    const uint8_t *plane; /* [seq, heads, dim] */
    const uint8_t *repeated;
    size_t seq, heads, dim, block_seq, rows_per_block;
    const uint8_t *cands;
    int n_cands;
    double margin;
} choice_job;

/* Byte code of candidate `pid` at sampled row r, channel i (prev: the block's previous row or NULL). */
static void sample_codes(int pid, const uint8_t *cur, const uint8_t *prev, int cur_repeated, size_t heads,
                         size_t dim, uint8_t *tmp_cur, uint8_t *tmp_prev, uint32_t *hist) {
    size_t c = heads * dim;
    switch (pid) {
    case P_RAW:
        if (cur_repeated)
            hist[0] += (uint32_t)c; /* zstd codes a repeated row as one match: near free */
        else
            for (size_t i = 0; i < c; i++) hist[cur[i]]++;
        break;
    case P_DELTA:
        for (size_t i = 0; i < c; i++) hist[(uint8_t)(cur[i] - (prev ? prev[i] : 0))]++;
        break;
    case P_XOR:
        for (size_t i = 0; i < c; i++) hist[(uint8_t)(cur[i] ^ (prev ? prev[i] : 0))]++;
        break;
    case P_PAIR:
        pair_forward_row(tmp_cur, cur, heads, dim);
        for (size_t i = 0; i < c; i++) hist[tmp_cur[i]]++;
        break;
    default:
        pair_forward_row(tmp_cur, cur, heads, dim);
        if (prev)
            pair_forward_row(tmp_prev, prev, heads, dim);
        for (size_t i = 0; i < c; i++) hist[(uint8_t)(tmp_cur[i] - (prev ? tmp_prev[i] : 0))]++;
        break;
    }
}

/* ids[b] (predictor id) for every block; returns the plan's estimated bits per sampled byte, or -1 (no memory). */
static double choose_predictors(const choice_job *job, uint8_t *ids) {
    size_t c = job->heads * job->dim, blocks = (job->seq + job->block_seq - 1) / job->block_seq;
    int n = job->n_cands;
    if (job->seq == 0 || c == 0) {
        memset(ids, job->cands[0], blocks);
        return 8.0;
    }
    uint32_t *block_hist = calloc((size_t)n * 256, sizeof(uint32_t));
    uint32_t *uniform = calloc((size_t)n * 256, sizeof(uint32_t));
    uint32_t *mixed = calloc(256, sizeof(uint32_t));
    uint8_t *tmp = malloc(2 * c);
    size_t *rows = malloc(job->rows_per_block * sizeof(size_t));
    uint8_t *mixed_ids = malloc(blocks);
    if (!block_hist || !uniform || !mixed || !tmp || !rows || !mixed_ids) {
        free(block_hist); free(uniform); free(mixed); free(tmp); free(rows); free(mixed_ids);
        return -1.0;
    }
    int mixed_not_raw = 0;
    uint64_t sampled = 0;
    for (size_t b = 0; b < blocks; b++) {
        size_t start = b * job->block_seq, len = job->seq - start < job->block_seq ? job->seq - start : job->block_seq;
        size_t k = block_sample(start, len, job->rows_per_block, rows);
        memset(block_hist, 0, (size_t)n * 256 * sizeof(uint32_t));
        for (size_t s = 0; s < k; s++) {
            size_t r = rows[s];
            const uint8_t *cur = job->plane + r * c, *prev = r > start ? cur - c : NULL;
            for (int j = 0; j < n; j++)
                sample_codes(job->cands[j], cur, prev, job->repeated[r], job->heads, job->dim, tmp, tmp + c,
                             block_hist + (size_t)j * 256);
        }
        sampled += (uint64_t)k * c;
        int best = 0;
        double best_cost = 0.0;
        for (int j = 0; j < n; j++) {
            int support;
            const uint32_t *h = block_hist + (size_t)j * 256;
            double cost = (entropy_bits(h, &support) + (support - 1) / (2.0 * 0.69314718055994530942)) *
                          (job->cands[j] == P_RAW ? 1.0 : 1.0 + job->margin);
            if (j == 0 || cost < best_cost) {
                best = j;
                best_cost = cost;
            }
            for (int i = 0; i < 256; i++) uniform[(size_t)j * 256 + i] += h[i];
        }
        mixed_ids[b] = job->cands[best];
        mixed_not_raw |= job->cands[best] != P_RAW;
        for (int i = 0; i < 256; i++) mixed[i] += block_hist[(size_t)best * 256 + i];
    }
    double mixed_cost = entropy_bits(mixed, NULL) * (mixed_not_raw ? 1.0 + job->margin : 1.0);
    int best_uniform = 0;
    double uniform_cost = 0.0, plain_bits = 0.0;
    for (int j = 0; j < n; j++) {
        double bits = entropy_bits(uniform + (size_t)j * 256, NULL);
        double cost = bits * (job->cands[j] == P_RAW ? 1.0 : 1.0 + job->margin);
        if (j == 0 || cost < uniform_cost) {
            best_uniform = j;
            uniform_cost = cost;
            plain_bits = bits;
        }
    }
    double bits;
    if (mixed_cost < uniform_cost) {
        memcpy(ids, mixed_ids, blocks);
        bits = entropy_bits(mixed, NULL);
    } else {
        memset(ids, job->cands[best_uniform], blocks);
        bits = plain_bits;
    }
    free(block_hist); free(uniform); free(mixed); free(tmp); free(rows); free(mixed_ids);
    return sampled ? bits / (double)sampled : 8.0;
}

/* ---- hi-plane centering ------------------------------------------------------------------------------ */

static inline uint8_t rotl1(uint8_t x) { return (uint8_t)((x << 1) | (x >> 7)); }
static inline uint8_t rotr1(uint8_t x) { return (uint8_t)((x >> 1) | (x << 7)); }

/* reference[i]: median over up to MEDIAN_ROWS evenly spread rows of the rotated channel i. */
static void median_reference(const uint8_t *hi, size_t seq, size_t c, uint8_t *reference, uint8_t *counts) {
    size_t m = seq < MEDIAN_ROWS ? seq : MEDIAN_ROWS;
    memset(counts, 0, c * 256);
    for (size_t j = 0; j < m; j++) {
        const uint8_t *row = hi + (j * seq / m) * c;
        for (size_t i = 0; i < c; i++) counts[i * 256 + rotl1(row[i])]++;
    }
    for (size_t i = 0; i < c; i++) {
        size_t seen = 0, v = 0;
        const uint8_t *cnt = counts + i * 256;
        while (v < 255 && (seen += cnt[v]) * 2 < m) v++;
        reference[i] = (uint8_t)v;
    }
}

/* Estimated bits saved by centering (sampled literal rows, scaled to the plane), minus its cost. */
static double centering_gain(const uint8_t *hi, const uint8_t *repeated, size_t seq, size_t c, size_t block_seq,
                             size_t rows_per_block, const uint8_t *reference, double margin) {
    uint32_t as_is[256] = {0}, centered[256] = {0};
    size_t rows[16], literal = 0, literal_rows = 0;
    for (size_t start = 0; start < seq; start += block_seq) {
        size_t len = seq - start < block_seq ? seq - start : block_seq;
        size_t k = block_sample(start, len, rows_per_block, rows);
        for (size_t s = 0; s < k; s++) {
            if (repeated[rows[s]])
                continue;
            const uint8_t *row = hi + rows[s] * c;
            for (size_t i = 0; i < c; i++) {
                as_is[row[i]]++;
                centered[(uint8_t)(rotl1(row[i]) - reference[i])]++;
            }
            literal++;
        }
    }
    for (size_t r = 0; r < seq; r++) literal_rows += !repeated[r];
    if (literal == 0)
        return -1.0;
    double per_row = (entropy_bits(as_is, NULL) - entropy_bits(centered, NULL)) / (double)literal;
    double before = entropy_bits(as_is, NULL) / (double)literal;
    return per_row * (double)literal_rows - 8.0 * (double)c - margin * before * (double)literal_rows;
}

/* ---- Python entry points ------------------------------------------------------------------------------- */

static int read_cands(Py_buffer *buf, const char *what) {
    if (buf->len < 1 || buf->len > MAX_CANDS) {
        PyErr_Format(PyExc_ValueError, "%s: expected 1..%d predictor ids, got %zd", what, MAX_CANDS, buf->len);
        return -1;
    }
    for (Py_ssize_t i = 0; i < buf->len; i++)
        if (((const uint8_t *)buf->buf)[i] >= N_PREDICTORS) {
            PyErr_Format(PyExc_ValueError, "%s: unknown predictor id %d", what, ((const uint8_t *)buf->buf)[i]);
            return -1;
        }
    return 0;
}

static int check_shape(Py_ssize_t seq, Py_ssize_t heads, Py_ssize_t dim, Py_ssize_t block_seq) {
    if (seq < 0 || heads < 0 || dim < 0 || block_seq < 1) {
        PyErr_SetString(PyExc_ValueError, "bad shape or block_seq");
        return -1;
    }
    if (heads && dim && seq > PY_SSIZE_T_MAX / 2 / heads / dim) {
        PyErr_SetString(PyExc_OverflowError, "tensor too large");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(encode_planes_doc,
"encode_planes(words, seq, heads, dim, block_seq, hi_cands, lo_cands, center, hi_margin, lo_margin,\n"
"              center_margin, center_check) -> (hi, hi_plain, lo, lo_plain, ids, centered, center_gain, lo_bits,\n"
"              lo_repeats, hi_repeats, hi_uncentered)\n\n"
"words: little-endian uint16 [seq, heads, dim] (C-contiguous buffer). hi_cands/lo_cands: predictor ids\n"
"(bytes) each plane may use. center: 0 never, 1 where the estimate says it pays, 2 always (seq >= 2).\n"
"hi: the coded hi plane (bytes; led by the reference row when centered); hi_plain: the hi plane before\n"
"predictors (None when every block is raw); lo / lo_plain likewise; ids: predictor id per hi block, then per\n"
"lo block; center_gain: the estimated bits saved by centering (0.0 when not estimated); lo_bits: estimated\n"
"bits per byte of the coded lo plane; lo_repeats / hi_repeats: rows of the lo / hi plane repeating an earlier row\n"
"(the hi plane as split, before centering); hi_uncentered: the hi plane as split (bytes) where centering was\n"
"estimated to save under center_check * 8 * seq * heads * dim bits (a close call for the caller to check), else\n"
"None.");

static PyObject *encode_planes(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer words, hi_cands, lo_cands;
    Py_ssize_t seq, heads, dim, block_seq;
    int center;
    double margins[2], center_margin, center_check;
    if (!PyArg_ParseTuple(args, "y*nnnny*y*idddd", &words, &seq, &heads, &dim, &block_seq, &hi_cands, &lo_cands,
                          &center, &margins[0], &margins[1], &center_margin, &center_check))
        return NULL;
    PyObject *result = NULL, *planes[2] = {NULL, NULL}, *plain[2] = {NULL, NULL}, *ids_obj = NULL;
    PyObject *uncentered = NULL;
    uint8_t *work = NULL;
    if (check_shape(seq, heads, dim, block_seq) < 0 || read_cands(&hi_cands, "hi_cands") < 0 ||
        read_cands(&lo_cands, "lo_cands") < 0)
        goto done;
    size_t c = (size_t)heads * (size_t)dim, n = (size_t)seq * c, blocks = ((size_t)seq + block_seq - 1) / block_seq;
    if ((size_t)words.len != 2 * n || !PyBuffer_IsContiguous(&words, 'C')) {
        PyErr_Format(PyExc_ValueError, "words: expected %zu contiguous bytes, got %zd", 2 * n, words.len);
        goto done;
    }
    int do_center = center && seq >= 2 && c > 0;
    /* work: split planes [2][n], coded planes [2][reference c + n], repeated flags [2][seq],
       median counts [c*256] */
    work = malloc(4 * n + 2 * c + 2 * (size_t)seq + c * 256 + 1);
    ids_obj = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(2 * blocks));
    if (!work || !ids_obj) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    uint8_t *split[2] = {work, work + n}, *coded[2] = {work + 2 * n, work + 3 * n + c};
    uint8_t *repeated[2] = {work + 4 * n + 2 * c, work + 4 * n + 2 * c + seq};
    uint8_t *reference = coded[0], *counts = repeated[1] + seq;
    uint8_t *ids = (uint8_t *)PyBytes_AS_STRING(ids_obj);
    const uint8_t *src = words.buf;
    int centered = 0, failed = 0;
    long lo_repeats = 0, hi_repeats = 0;
    double gain = 0.0, lo_bits = 8.0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++) {
        split[1][i] = src[2 * i];
        split[0][i] = src[2 * i + 1];
    }
    hi_repeats = mark_repeats(split[0], (size_t)seq, c, repeated[0]);
    lo_repeats = mark_repeats(split[1], (size_t)seq, c, repeated[1]);
    failed = hi_repeats < 0 || lo_repeats < 0;
    if (!failed && do_center) {
        median_reference(split[0], (size_t)seq, c, reference, counts);
        gain = centering_gain(split[0], repeated[0], (size_t)seq, c, (size_t)block_seq, 4, reference, center_margin);
        centered = center == 2 || gain > 0.0;
        if (centered) {
            for (size_t r = 0; r < (size_t)seq; r++) {
                uint8_t *row = split[0] + r * c;
                for (size_t i = 0; i < c; i++) row[i] = (uint8_t)(rotl1(row[i]) - reference[i]);
            }
        }
    }
    for (int p = 0; p < 2 && !failed; p++) {
        Py_buffer *cands = p ? &lo_cands : &hi_cands;
        choice_job job = {split[p], repeated[p], (size_t)seq, (size_t)heads, (size_t)dim, (size_t)block_seq,
                          p ? 2 : 4, cands->buf, (int)cands->len, margins[p]};
        double bits = choose_predictors(&job, ids + p * blocks);
        failed = bits < 0;
        if (p)
            lo_bits = bits;
    }
    if (!failed) {
        for (int p = 0; p < 2; p++) {
            uint8_t *dst = coded[p] + c;
            for (size_t b = 0; b < blocks; b++) {
                size_t start = b * (size_t)block_seq, len = (size_t)seq - start;
                if (len > (size_t)block_seq) len = (size_t)block_seq;
                forward_block(ids[p * blocks + b], dst + start * c, split[p] + start * c, len, (size_t)heads,
                              (size_t)dim);
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    for (int p = 0; p < 2; p++) {
        size_t ref = !p && centered ? c : 0;
        int any = 0;
        for (size_t b = 0; b < blocks; b++) any |= ids[p * blocks + b] != P_RAW;
        /* the reference row sits just before the coded plane; the plain plane gets its own copy */
        planes[p] = PyBytes_FromStringAndSize((const char *)coded[p] + c - ref, (Py_ssize_t)(ref + n));
        if (!planes[p]) goto done;
        if (any) {
            plain[p] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(ref + n));
            if (!plain[p]) goto done;
            memcpy(PyBytes_AS_STRING(plain[p]), coded[p] + c - ref, ref);
            memcpy(PyBytes_AS_STRING(plain[p]) + ref, split[p], n);
        } else {
            plain[p] = Py_NewRef(Py_None);
        }
    }
    if (centered && gain < center_check * 8.0 * (double)n) {
        uncentered = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
        if (!uncentered) goto done;
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(uncentered);
        for (size_t i = 0; i < n; i++) dst[i] = src[2 * i + 1];
    } else {
        uncentered = Py_NewRef(Py_None);
    }
    result = Py_BuildValue("OOOOOOddllO", planes[0], plain[0], planes[1], plain[1], ids_obj,
                           centered ? Py_True : Py_False, gain, lo_bits, lo_repeats, hi_repeats, uncentered);
done:
    Py_XDECREF(uncentered);
    Py_XDECREF(planes[0]); Py_XDECREF(planes[1]); Py_XDECREF(plain[0]); Py_XDECREF(plain[1]); Py_XDECREF(ids_obj);
    free(work);
    PyBuffer_Release(&words);
    PyBuffer_Release(&hi_cands);
    PyBuffer_Release(&lo_cands);
    return result;
}

PyDoc_STRVAR(decode_planes_doc,
"decode_planes(out, hi, lo, seq, heads, dim, block_seq, ids, centered) -> None\n\n"
"out: writable buffer of 2*seq*heads*dim bytes (little-endian uint16 [seq, heads, dim]); hi: the decoded hi\n"
"payload (led by heads*dim reference bytes when centered), lo: the lo payload; ids: predictor id per hi block\n"
"then per lo block (already validated). Raises ValueError on any size mismatch.");

static PyObject *decode_planes(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer out, hi, lo, ids;
    Py_ssize_t seq, heads, dim, block_seq;
    int centered;
    if (!PyArg_ParseTuple(args, "w*y*y*nnnny*p", &out, &hi, &lo, &seq, &heads, &dim, &block_seq, &ids, &centered))
        return NULL;
    PyObject *result = NULL;
    uint8_t *work = NULL;
    if (check_shape(seq, heads, dim, block_seq) < 0)
        goto done;
    size_t c = (size_t)heads * (size_t)dim, n = (size_t)seq * c, blocks = ((size_t)seq + block_seq - 1) / block_seq;
    size_t ref = centered ? c : 0;
    if ((size_t)out.len != 2 * n || (size_t)hi.len != ref + n || (size_t)lo.len != n || (size_t)ids.len != 2 * blocks ||
        !PyBuffer_IsContiguous(&out, 'C')) {
        PyErr_SetString(PyExc_ValueError, "decode_planes: buffer sizes do not match the shape");
        goto done;
    }
    const uint8_t *id = ids.buf;
    for (size_t i = 0; i < 2 * blocks; i++)
        if (id[i] >= N_PREDICTORS) {
            PyErr_Format(PyExc_ValueError, "decode_planes: unknown predictor id %d", id[i]);
            goto done;
        }
    work = malloc(2 * n + 1);
    if (!work) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint8_t *reference = (const uint8_t *)hi.buf;
    memcpy(work, (const uint8_t *)hi.buf + ref, n);
    memcpy(work + n, lo.buf, n);
    for (int p = 0; p < 2; p++)
        for (size_t b = 0; b < blocks; b++) {
            size_t start = b * (size_t)block_seq, len = (size_t)seq - start;
            if (len > (size_t)block_seq) len = (size_t)block_seq;
            inverse_block(id[p * blocks + b], work + p * n + start * c, len, (size_t)heads, (size_t)dim);
        }
    uint8_t *dst = out.buf;
    if (ref) {
        for (size_t r = 0; r < (size_t)seq; r++) {
            uint8_t *row = work + r * c;
            for (size_t i = 0; i < c; i++) row[i] = rotr1((uint8_t)(row[i] + reference[i]));
        }
    }
    {
        for (size_t i = 0; i < n; i++) {
            dst[2 * i + 1] = work[i];
            dst[2 * i] = work[n + i];
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    free(work);
    PyBuffer_Release(&out);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&lo);
    PyBuffer_Release(&ids);
    return result;
}

PyDoc_STRVAR(zstd_frame_size_doc,
"zstd_frame_size(buf, start) -> int\n\n"
"Bytes from `start` to the end of the zstd frame whose blocks begin there (a frame without its frame header and\n"
"with no checksum, as the fast profile's version-3 payloads): walks the 3-byte block headers (RFC 8878, 3.1.1.2:\n"
"bit 0 last block, bits 1-2 type, bits 3-23 size) to the last block. Raises ValueError for a reserved block type,\n"
"a block over 128 KiB, or a frame running past the buffer's end.");

#define ZSTD_BLOCK_MAX (128 * 1024)

static PyObject *zstd_frame_size(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "y*n", &buf, &start))
        return NULL;
    PyObject *result = NULL;
    if (start < 0 || start > buf.len) {
        PyErr_SetString(PyExc_ValueError, "zstd_frame_size: start outside the buffer");
        goto done;
    }
    const uint8_t *p = buf.buf;
    size_t at = (size_t)start, end = (size_t)buf.len;
    int error = 0; /* 1 truncated, 2 reserved block type, 3 block too large */
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        if (end - at < 3) {
            error = 1;
            break;
        }
        uint32_t h = (uint32_t)p[at] | ((uint32_t)p[at + 1] << 8) | ((uint32_t)p[at + 2] << 16);
        uint32_t last = h & 1u, type = (h >> 1) & 3u, size = h >> 3;
        at += 3;
        if (type == 3) {
            error = 2;
            break;
        }
        if (size > ZSTD_BLOCK_MAX) {
            error = 3;
            break;
        }
        size_t content = type == 1 ? 1 : (size_t)size;
        if (end - at < content) {
            error = 1;
            break;
        }
        at += content;
        if (last)
            break;
    }
    Py_END_ALLOW_THREADS
    if (error == 1)
        PyErr_SetString(PyExc_ValueError, "zstd frame runs past the end of its payload");
    else if (error == 2)
        PyErr_SetString(PyExc_ValueError, "zstd block of the reserved type 3");
    else if (error == 3)
        PyErr_SetString(PyExc_ValueError, "zstd block larger than 128 KiB");
    else
        result = PyLong_FromSize_t(at - (size_t)start);
done:
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"encode_planes", encode_planes, METH_VARARGS, encode_planes_doc},
    {"decode_planes", decode_planes, METH_VARARGS, decode_planes_doc},
    {"zstd_frame_size", zstd_frame_size, METH_VARARGS, zstd_frame_size_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcore",
                                    "The fast profile's kernels: plane split, estimates and predictors, in C.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastcore(void) {
    for (int i = 2; i < PLOGP_TABLE; i++) plogp_table[i] = (double)i * log2((double)i);
    return PyModule_Create(&module);
}
