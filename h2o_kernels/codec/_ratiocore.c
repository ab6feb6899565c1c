/* h2o_kernels.codec._ratiocore: the ratio profile's coder (blob version 2, model id 1).
 *
 * A tensor of fp16 words [seq, C] (C = kv_heads * head_dim channels) is coded row by row:
 *   - exact repeat of an earlier row: adaptive flag + the row index in bit_length(t-1) equiprobable bits;
 *   - RoPE match (K, when a RoPE spec is given): adaptive flag + index, then per channel the residual of
 *     the row against the earlier row re-rotated by the position difference (fp16 ordinal units);
 *   - literal row: optional reference row (adaptive flag + index in bit_length(t-2) bits, default t-1),
 *     the lo bytes raw (returned separately), the hi bytes centred on the channel's running mean and coded
 *     MSB first as 8 binary decisions, depth-major (all channels' depth-d decision, then depth d+1), each
 *     the integer logistic mix (lpaq-style) of 3 adaptive counters (the channel's bit tree, everyone's given
 *     the reference row, everyone's bit tree) + a bias.
 * Two binary range coders (LZMA's: 32-bit range, 12-bit probabilities, carry through a cache byte) share the
 * work: channel c's hi-byte decisions go to coder c & 1 (the last channel of an odd C to coder 0), every other
 * decision to coder 0. The stream is coder 0's bytes followed by coder 1's in reverse order (no length field:
 * coder 1's decoder reads from the end; together they must consume the stream exactly).
 * Every constant below is part of the format. The model is integer-only; the RoPE prediction uses
 * IEEE-754 double +,-,*,/ only (correctly rounded everywhere; no libm, no contraction, FLT_EVAL_METHOD 0)
 * and an integer double -> fp16 rounding, so every platform codes and decodes the same bits.
 * Decoding errors raise ValueError with a specific message (ratio.py turns them into CodecError).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "the RoPE prediction needs double arithmetic evaluated in double (FLT_EVAL_METHOD == 0)"
#endif
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the coder reads the tensor's little-endian fp16 words as native uint16_t: little-endian hosts only"
#endif

#define MAX_CHANNELS 65536 /* kv_heads * head_dim; bounds the per-channel tables (1 KiB a channel) */
#define RATE_LIMIT_CH 30   /* per-channel counters: rate 1/(n+1.5) up to this count */
#define RATE_LIMIT_SH 255  /* shared counters */
#define NIN 4              /* mixer inputs: channel tree, shared reference, shared tree, bias */
#define BATCH_SHIFT 14     /* depth-major mixer step: the summed gradient of one depth >> 14 */
#define REF_MARGIN 8       /* encoder: a reference row must share 8 more hi bytes than row t-1 */
#define ROPE_BITS_PER_CH 10 /* encoder: a RoPE match must cost less than ~10 bits a channel */
#define ROPE_CANDIDATES 2  /* encoder: rows verified per RoPE search (nearest sketches) */
#define ROPE_SKETCH_DIV 16 /* encoder: ... and only those whose sketch differs in at most C/16 channels */
#define RES_LEN_MAX 17     /* residual magnitude bit length: 1..17 */

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE static inline
#endif

/* ---------------------------------------------------------------- well-defined integer helpers */
/* floor(x / 2^s), 1 <= s <= 62, branch-free: shift the magnitude-complement of a negative x, complement back */
static inline int64_t asr64(int64_t x, int s) {
    uint64_t neg = (uint64_t)x >> 63, m = 0 - neg;
    return (int64_t)((((uint64_t)x) ^ m) >> s) ^ -(int64_t)neg;
}
/* floor(x / 2^s), 1 <= s <= 30 */
static inline int32_t asr32(int32_t x, int s) {
    uint32_t neg = (uint32_t)x >> 31, m = 0u - neg;
    return (int32_t)((((uint32_t)x) ^ m) >> s) ^ -(int32_t)neg;
}
static inline int32_t clamp32(int64_t x, int32_t lo, int32_t hi) { return x < lo ? lo : (x > hi ? hi : (int32_t)x); }
static inline int bit_length(uint32_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return x ? 32 - __builtin_clz(x) : 0;
#else
    int n = 0;
    while (x) { n++; x >>= 1; }
    return n;
#endif
}

static inline uint32_t popcount64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
    return (uint32_t)__builtin_popcountll(x);
#else
    x = x - ((x >> 1) & 0x5555555555555555ull);
    x = (x & 0x3333333333333333ull) + ((x >> 2) & 0x3333333333333333ull);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0Full;
    return (uint32_t)((x * 0x0101010101010101ull) >> 56);
#endif
}

/* ---------------------------------------------------------------- squash / stretch (lpaq's tables) */
static const int32_t SQ[33] = {1, 2, 3, 6, 10, 16, 27, 45, 73, 120, 194, 310, 488, 747, 1101, 1546, 2047, 2549,
                               2994, 3348, 3607, 3785, 3901, 3975, 4022, 4050, 4068, 4079, 4085, 4089, 4092, 4093,
                               4094};
static inline int32_t squash(int32_t d) { /* 4096 / (1 + e^(-d/256)) by interpolation: -2047..2047 -> 1..4095 */
    if (d > 2047) return 4095;
    if (d < -2047) return 1;
    int32_t u = d + 2048, w = u & 127, i = u >> 7;
    return (SQ[i] * (128 - w) + SQ[i + 1] * w + 64) >> 7;
}
static int16_t ST[4096];
static int32_t STP[4096];  /* ST[p12(s)] indexed by s >> 12, for a counter state s */
static int32_t SQI[4097];  /* squash(d - 2048), d in 0..4096 */
/* RATE[n] = 2^17 / (2n + 3): a counter seen n times moves 1/(n + 1.5) of the way (a const table: loads
 * from it cannot alias the passes' stores, so the vectoriser keeps the counter updates) */
static const int32_t RATE[256] = {
    43690, 26214, 18724, 14563, 11915, 10082, 8738, 7710, 6898, 6241, 5698, 5242, 4854, 4519, 4228, 3971,
    3744, 3542, 3360, 3196, 3048, 2912, 2788, 2674, 2570, 2473, 2383, 2299, 2221, 2148, 2080, 2016,
    1956, 1899, 1846, 1795, 1747, 1702, 1659, 1618, 1579, 1542, 1506, 1472, 1440, 1409, 1379, 1351,
    1323, 1297, 1272, 1248, 1224, 1202, 1180, 1159, 1139, 1120, 1101, 1083, 1065, 1048, 1032, 1016,
    1000, 985, 970, 956, 942, 929, 916, 903, 891, 879, 868, 856, 845, 834, 824, 814,
    804, 794, 784, 775, 766, 757, 748, 740, 732, 724, 716, 708, 700, 693, 686, 679,
    672, 665, 658, 652, 645, 639, 633, 627, 621, 615, 609, 604, 598, 593, 587, 582,
    577, 572, 567, 562, 557, 553, 548, 543, 539, 534, 530, 526, 522, 518, 514, 510,
    506, 502, 498, 494, 490, 487, 483, 480, 476, 473, 469, 466, 463, 459, 456, 453,
    450, 447, 444, 441, 438, 435, 432, 429, 426, 424, 421, 418, 416, 413, 410, 408,
    405, 403, 400, 398, 395, 393, 391, 388, 386, 384, 382, 379, 377, 375, 373, 371,
    369, 367, 365, 363, 361, 359, 357, 355, 353, 351, 349, 347, 345, 344, 342, 340,
    338, 336, 335, 333, 331, 330, 328, 326, 325, 323, 322, 320, 318, 317, 315, 314,
    312, 311, 309, 308, 306, 305, 304, 302, 301, 299, 298, 297, 295, 294, 293, 291,
    290, 289, 288, 286, 285, 284, 283, 281, 280, 279, 278, 277, 275, 274, 273, 272,
    271, 270, 269, 268, 266, 265, 264, 263, 262, 261, 260, 259, 258, 257, 256, 255,
};
static double F16[65536];

static void init_tables(void) {
    int32_t pi = 0;
    for (int32_t x = -2047; x <= 2047; x++) {
        int32_t v = squash(x);
        for (int32_t i = pi; i <= v; i++) ST[i] = (int16_t)x;
        pi = v + 1;
    }
    for (int32_t i = pi; i < 4096; i++) ST[i] = 2047;
    for (int32_t d = 0; d <= 4096; d++) SQI[d] = squash(d - 2048);
    for (int32_t i = 0; i < 4096; i++) STP[i] = ST[i < 1 ? 1 : i];
    for (uint32_t w = 0; w < 65536; w++) { /* exact fp16 -> double from the bits */
        uint32_t e = (w >> 10) & 31, m = w & 1023;
        uint64_t bits;
        if (e == 31) bits = m ? 0x7FF8000000000000ull : 0x7FF0000000000000ull;
        else if (e == 0) {
            double v = (double)m;
            for (int k = 0; k < 24; k++) v *= 0.5; /* m * 2^-24, exact */
            memcpy(&bits, &v, 8);
        } else bits = ((uint64_t)(e - 15 + 1023) << 52) | ((uint64_t)m << 42);
        if (w & 0x8000) bits |= 0x8000000000000000ull;
        memcpy(&F16[w], &bits, 8);
    }
}

/* ---------------------------------------------------------------- adaptive counters */
/* state: probability of a 1 (16 bits) << 8 | count */
#define CTR_INIT (32768u << 8)
static inline int32_t p12(uint32_t s) { int32_t p = (int32_t)(s >> 12); return p < 1 ? 1 : (p > 4095 ? 4095 : p); }
static inline uint32_t ctr_upd(uint32_t s, int bit, uint32_t limit) {
    int64_t p = s >> 8;
    uint32_t n = s & 255;
    int64_t target = (int64_t)((0 - (uint32_t)bit) & 65535u); /* 65535 for a 1, 0 for a 0 */
    p += asr64((target - p) * RATE[n], 16);
    n += n < limit;
    return ((uint32_t)p << 8) | n;
}

/* ---------------------------------------------------------------- range coder */
typedef struct {
    uint64_t low;
    uint32_t range, code;
    uint8_t cache;
    uint64_t csize;
    uint8_t *buf;
    size_t pos, cap; /* encoder: bytes written / allocated; decoder: bytes consumed / stream length */
    size_t over;     /* decoder: bytes read past the end */
    int oom;         /* encoder: allocation failed */
    int rev;         /* decoder: read the stream from its end backwards (the second coder) */
} rc_t;

static void rc_put(rc_t *r, uint8_t b) {
    if (r->pos == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 4096;
        uint8_t *nb = (uint8_t *)realloc(r->buf, cap);
        if (!nb) { r->oom = 1; r->pos = 0; return; }
        r->buf = nb;
        r->cap = cap;
    }
    r->buf[r->pos++] = b;
}
static void shift_low(rc_t *r) {
    if (r->low < 0xFF000000u || r->low >= (1ull << 32)) {
        uint8_t carry = (uint8_t)(r->low >> 32), temp = r->cache;
        do { rc_put(r, (uint8_t)(temp + carry)); temp = 0xFF; } while (--r->csize);
        r->cache = (uint8_t)(r->low >> 24);
    }
    r->csize++;
    r->low = (r->low & 0x00FFFFFFu) << 8;
}
static inline uint8_t rc_byte(rc_t *r) {
    uint8_t b = 0;
    if (r->pos < r->cap) b = r->buf[r->rev ? r->cap - 1 - r->pos : r->pos]; else r->over++;
    r->pos++;
    return b;
}
/* code one binary decision with P(1) = p/4096; the encoder passes the bit, the decoder gets it back */
static inline int rc_bit(rc_t *r, int enc, int32_t p, int bit) {
    uint32_t bound = (r->range >> 12) * (uint32_t)p;
    if (enc) { /* branch-free: the bits are close to random */
        uint32_t mask = (uint32_t)bit - 1u; /* 0 for a 1, all ones for a 0 */
        r->low += bound & mask;
        r->range = (bound & ~mask) | ((r->range - bound) & mask);
        while (r->range < (1u << 24)) { r->range <<= 8; shift_low(r); }
        return bit;
    }
    bit = r->code < bound;
    uint32_t mask = (uint32_t)bit - 1u;
    r->code -= bound & mask;
    r->range = (bound & ~mask) | ((r->range - bound) & mask);
    while (r->range < (1u << 24)) { r->range <<= 8; r->code = (r->code << 8) | rc_byte(r); }
    return bit;
}
static inline uint32_t rc_index(rc_t *r, int enc, int nbits, uint32_t j) { /* equiprobable bits, MSB first */
    uint32_t out = 0;
    for (int k = nbits - 1; k >= 0; k--) out = (out << 1) | (uint32_t)rc_bit(r, enc, 2048, (int)((j >> k) & 1));
    return out;
}

/* One rc_bit of the encoder (step_enc) or decoder (step_dec) with the coder's state in the caller's registers */
ALWAYS_INLINE void step_enc(rc_t *r, uint64_t *low, uint32_t *range, int32_t p, int32_t bit) {
    uint32_t bound = (*range >> 12) * (uint32_t)p, mask = (uint32_t)bit - 1u;
    *low += bound & mask;
    *range = (bound & ~mask) | ((*range - bound) & mask);
    while (*range < (1u << 24)) {
        *range <<= 8;
        r->low = *low;
        shift_low(r);
        *low = r->low;
    }
}
ALWAYS_INLINE int32_t step_dec(rc_t *r, uint32_t *code, uint32_t *range, int32_t p) {
    uint32_t bound = (*range >> 12) * (uint32_t)p;
    int32_t bit = *code < bound;
    uint32_t mask = (uint32_t)bit - 1u;
    *code -= bound & mask;
    *range = (bound & ~mask) | ((*range - bound) & mask);
    while (*range < (1u << 24)) {
        *range <<= 8;
        *code = (*code << 8) | rc_byte(r);
    }
    return bit;
}
/* rc_bit over C channels with the probabilities pr, channel c with coder r[c & 1] (the last one of an odd C
 * with r[0]): two independent coders, so the CPU overlaps their dependency chains. The encoder codes bit sh
 * of each sym and stores it in bits, the decoder decodes into bits. */
static void rc_encode_pass(rc_t *r, const int32_t *pr, const int32_t *sym, int32_t *bits, size_t C, int sh) {
    uint64_t low0 = r[0].low, low1 = r[1].low;
    uint32_t range0 = r[0].range, range1 = r[1].range;
    size_t c = 0;
    for (; c + 1 < C; c += 2) {
        int32_t b0 = (sym[c] >> sh) & 1, b1 = (sym[c + 1] >> sh) & 1;
        bits[c] = b0;
        bits[c + 1] = b1;
        step_enc(&r[0], &low0, &range0, pr[c], b0);
        step_enc(&r[1], &low1, &range1, pr[c + 1], b1);
    }
    if (c < C) {
        bits[c] = (sym[c] >> sh) & 1;
        step_enc(&r[0], &low0, &range0, pr[c], bits[c]);
    }
    r[0].low = low0;
    r[0].range = range0;
    r[1].low = low1;
    r[1].range = range1;
}
static void rc_decode_pass(rc_t *r, const int32_t *pr, int32_t *bits, size_t C) {
    uint32_t range0 = r[0].range, code0 = r[0].code, range1 = r[1].range, code1 = r[1].code;
    size_t c = 0;
    for (; c + 1 < C; c += 2) {
        bits[c] = step_dec(&r[0], &code0, &range0, pr[c]);
        bits[c + 1] = step_dec(&r[1], &code1, &range1, pr[c + 1]);
    }
    if (c < C) bits[c] = step_dec(&r[0], &code0, &range0, pr[c]);
    r[0].range = range0;
    r[0].code = code0;
    r[1].range = range1;
    r[1].code = code1;
}

/* ---------------------------------------------------------------- deterministic RoPE arithmetic */
/* cos and sin of x (|x| < 2^31) from +,-,*,/ only: Cody-Waite reduction by pi/2 (fdlibm's split), then
 * Taylor polynomials on [-pi/4, pi/4]. Accuracy ~1e-16 for small x; it only shapes predictions. */
static void det_cossin(double x, double *c, double *s) {
    const double inv_pio2 = 6.36619772367581382433e-01, p1 = 1.57079632673412561417e+00,
                 p2 = 6.07710050650619224932e-11, p3 = 2.02226624871116645580e-21;
    double kf = x * inv_pio2;
    int64_t k = (int64_t)(kf >= 0 ? kf + 0.5 : kf - 0.5);
    double kd = (double)k;
    double r = ((x - kd * p1) - kd * p2) - kd * p3;
    double r2 = r * r;
    double sp = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 +
                r2 * (-1.0 / 39916800 + r2 * (1.0 / 6227020800.0)))))));
    double cp = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800 +
                r2 * (1.0 / 479001600.0 + r2 * (-1.0 / 87178291200.0)))))));
    switch ((int)(((uint64_t)k) & 3)) {
    case 0: *c = cp; *s = sp; break;
    case 1: *c = -sp; *s = cp; break;
    case 2: *c = -cp; *s = -sp; break;
    default: *c = sp; *s = -cp; break;
    }
}
static double det_log(double x) { /* x > 0 finite: x = m 2^e, ln m = 2 atanh((m-1)/(m+1)) */
    int e = 0;
    while (x >= 2.0) { x *= 0.5; e++; }
    while (x < 1.0) { x *= 2.0; e--; }
    if (x > 1.41421356237309504880) { x *= 0.5; e++; }
    double z = (x - 1.0) / (x + 1.0), z2 = z * z, term = z, sum = 0.0;
    for (int k = 1; k < 60; k += 2) { sum += term / k; term *= z2; }
    return 2.0 * sum + e * 6.93147180559945286227e-01;
}
static double det_exp(double y) { /* y <= 0, modest: e^y = 2^k e^r, |r| <= ln2/2 */
    const double ln2 = 6.93147180559945286227e-01;
    double kf = y / ln2;
    int64_t k = (int64_t)(kf >= 0 ? kf + 0.5 : kf - 0.5);
    double r = y - (double)k * ln2, term = 1.0, sum = 1.0;
    for (int n = 1; n < 25; n++) { term = term * r / n; sum += term; }
    for (; k > 0; k--) sum *= 2.0;
    for (; k < 0; k++) sum *= 0.5;
    return sum;
}
/* inv_freq[i] = theta^(-2i/dim), i < dim/2 (the transformers/LLaMA RoPE frequencies) */
static void rope_freqs(double theta, int dim, double *inv_freq) {
    double lt = det_log(theta);
    for (int i = 0; i < dim / 2; i++) inv_freq[i] = det_exp(-(2.0 * i / dim) * lt);
}
/* double -> fp16 bits, round to nearest even, from the double's bits; every NaN -> 0x7E00 */
static uint16_t f64_to_f16(double x) {
    uint64_t u;
    memcpy(&u, &x, 8);
    uint16_t sign = (uint16_t)((u >> 48) & 0x8000);
    uint64_t a = u & 0x7FFFFFFFFFFFFFFFull;
    if (a > 0x7FF0000000000000ull) return 0x7E00;
    if (a == 0x7FF0000000000000ull) return (uint16_t)(sign | 0x7C00);
    int e = (int)(a >> 52) - 1023;
    uint64_t m = (a & 0xFFFFFFFFFFFFFull) | (1ull << 52);
    if ((a >> 52) == 0) return sign; /* double subnormal: far below fp16's range */
    if (e > 15) return (uint16_t)(sign | 0x7C00);
    int shift = e >= -14 ? 42 : 42 + (-14 - e); /* fp16 subnormals: units of 2^-24 */
    if (shift > 60) return sign;
    uint64_t q = m >> shift, rem = m & ((1ull << shift) - 1), half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    uint32_t out = e >= -14 ? (uint32_t)((e + 15) << 10) + (uint32_t)(q - 1024) : (uint32_t)q;
    if (out >= 0x7C00) out = 0x7C00;
    return (uint16_t)(sign | out);
}
static inline int32_t ordinal(uint16_t w) { return w < 0x8000 ? (int32_t)w : -1 - (int32_t)(w & 0x7FFF); }
static inline uint16_t from_ordinal(int32_t o) { return (uint16_t)(o >= 0 ? o : 0x8000 | (-1 - o)); }

#define ROPE_MEMO_BYTES (1 << 20) /* angles kept for the position differences 0..memo_len-1 */
typedef struct {
    int on, interleaved, heads, dim, half;
    double *inv_freq; /* [half] */
    double *cs;       /* [2 * half] scratch: cos then sin */
    double *memo;     /* [memo_len][2 * half] cos and sin of small position differences, filled on first use */
    uint8_t *memo_ok; /* [memo_len] */
    size_t memo_len;
} rope_t;

/* pair p of a head: the two dims and the frequency index */
static inline void pair_dims(const rope_t *rp, int i, int *a, int *b) {
    if (rp->interleaved) { *a = 2 * i; *b = 2 * i + 1; } else { *a = i; *b = i + rp->half; }
}
/* cos (cs[0..half)) and sin (cs[half..2 half)) of delta * inv_freq: from the memo for small delta */
static const double *rope_angles(rope_t *rp, int64_t delta) {
    double *cs = rp->cs;
    if (delta >= 0 && (uint64_t)delta < rp->memo_len) {
        cs = rp->memo + (size_t)delta * 2 * (size_t)rp->half;
        if (rp->memo_ok[delta]) return cs;
        rp->memo_ok[delta] = 1;
    }
    for (int i = 0; i < rp->half; i++) det_cossin((double)delta * rp->inv_freq[i], &cs[i], &cs[rp->half + i]);
    return cs;
}
/* pred[C] = row rotated by the angles cs (rope_angles of the position difference) */
static void rope_predict(const rope_t *rp, const double *cs, const uint16_t *row, uint16_t *pred) {
    for (int h = 0; h < rp->heads; h++) {
        const uint16_t *x = row + (size_t)h * rp->dim;
        uint16_t *y = pred + (size_t)h * rp->dim;
        for (int i = 0; i < rp->half; i++) {
            int da, db;
            pair_dims(rp, i, &da, &db);
            double a = F16[x[da]], b = F16[x[db]], c = cs[i], s = cs[rp->half + i];
            double pa = a * c - b * s, pb = a * s + b * c;
            y[da] = f64_to_f16(pa);
            y[db] = f64_to_f16(pb);
        }
    }
}

/* ---------------------------------------------------------------- the model */
typedef struct {
    size_t C;
    uint32_t *t_chan;  /* [C * 256] channel bit-tree */
    uint32_t t_gprev[32], t_glob[256];
    uint32_t t_match[2], t_rope[2], t_ref[2], t_rz[2], t_rs[1], t_ru[RES_LEN_MAX + 1], t_rl[RES_LEN_MAX + 2];
    int32_t w[16][NIN];
    int64_t *csum;     /* [C] sum of the centred magnitudes of earlier rows */
    /* [C] per-row scratch: centre, centred symbol, centred reference byte, bit-tree node, prefix equals the
     * reference, context of t_gprev, stretched channel-tree prediction, P(1), bit */
    int32_t *ctr, *sym, *prv, *node, *eq, *cx, *s0, *pr, *bits;
    uint32_t *ua;      /* [C] updated channel counters */
    uint16_t *pred;    /* [C] RoPE prediction */
} model_t;

static void model_free(model_t *m) {
    free(m->t_chan); free(m->csum); free(m->ctr); free(m->sym); free(m->prv); free(m->node);
    free(m->eq); free(m->cx); free(m->s0); free(m->pr); free(m->bits); free(m->pred); free(m->ua);
}
static int model_init(model_t *m, size_t C) {
    memset(m, 0, sizeof *m);
    m->C = C;
    m->t_chan = (uint32_t *)malloc(C * 256 * sizeof(uint32_t));
    m->csum = (int64_t *)calloc(C, sizeof(int64_t));
    int32_t **scratch[] = {&m->ctr, &m->sym, &m->prv, &m->node, &m->eq, &m->cx, &m->s0, &m->pr, &m->bits};
    int ok = m->t_chan && m->csum;
    for (size_t k = 0; k < sizeof scratch / sizeof *scratch; k++) {
        *scratch[k] = (int32_t *)malloc(C * sizeof(int32_t));
        ok = ok && *scratch[k];
    }
    m->pred = (uint16_t *)malloc(C * sizeof(uint16_t));
    m->ua = (uint32_t *)malloc(C * sizeof(uint32_t));
    if (!ok || !m->pred || !m->ua) { model_free(m); return -1; }
    for (size_t i = 0; i < C * 256; i++) m->t_chan[i] = CTR_INIT;
    uint32_t *small[] = {m->t_gprev, m->t_glob, m->t_match, m->t_rope, m->t_ref, m->t_rz, m->t_rs, m->t_ru, m->t_rl};
    size_t sizes[] = {32, 256, 2, 2, 2, 2, 1, RES_LEN_MAX + 1, RES_LEN_MAX + 2};
    for (int k = 0; k < 9; k++) for (size_t i = 0; i < sizes[k]; i++) small[k][i] = CTR_INIT;
    for (int i = 0; i < 16; i++) for (int k = 0; k < NIN; k++) m->w[i][k] = 65536 / 3;
    return 0;
}

/* a shared counter seen n times in one batch (a depth of a row), k of them 1s */
static inline uint32_t batch_upd(uint32_t s, int64_t n, int64_t k) {
    if (!n) return s;
    int64_t p = s >> 8, target = (k * 65535 + n / 2) / n;
    uint32_t cnt = s & 255;
    p += asr64((target - p) * RATE[cnt], 16);
    if (cnt < RATE_LIMIT_SH) cnt++;
    return ((uint32_t)p << 8) | cnt;
}

/* one adaptive decision with a shared counter */
static inline int code_flag(rc_t *r, int enc, uint32_t *ctr, int bit) {
    bit = rc_bit(r, enc, p12(*ctr), bit);
    *ctr = ctr_upd(*ctr, bit, RATE_LIMIT_SH);
    return bit;
}

/* ---------------------------------------------------------------- literal hi bytes: the depth passes
 * The passes over the channels are written for the vectoriser: 32-bit lanes, table lookups as gathers, no
 * branches. Each 64-bit product of the model is split exactly into 32-bit ones (the splits below), so the
 * passes give the bits of the straightforward int64 formulas. They are compiled twice, plain and for AVX2
 * (x86-64 with GCC or Clang); the AVX2 copy runs where the CPU has it (see literal_hi_impl). */

/* The channel counter update ctr_upd(s, bit, RATE_LIMIT_CH) in 32-bit arithmetic: with d = target - p
 * (|d| < 2^16) and RATE[n] = 256 rh + rl, floor(d RATE[n] / 2^16) = floor((d rh + floor(d rl / 2^8)) / 2^8). */
static inline uint32_t ctr_upd_ch(uint32_t s, int32_t bit) {
    int32_t p = (int32_t)(s >> 8), n = (int32_t)(s & 255), rate = RATE[n];
    int32_t d = (int32_t)((0u - (uint32_t)bit) & 65535u) - p;
    p += asr32(d * (rate >> 8) + asr32(d * (rate & 255), 8), 8);
    n += n < RATE_LIMIT_CH;
    return ((uint32_t)p << 8) | (uint32_t)n;
}

/* The mixer weights of one depth split for 32-bit dot products: w = 2^16 wh + wl, 0 <= wl < 2^16, so
 * floor(sum w_k s_k / 2^16) = sum wh_k s_k + floor(sum wl_k s_k / 2^16) (|s_k| <= 2047: no overflow). */
typedef struct { int32_t h[2][NIN], l[2][NIN]; } wsplit_t;

/* depth pass 1: P(1) of every channel's decision (independent across channels) */
ALWAYS_INLINE void predict_pass(int32_t n, int32_t depth, int32_t has_prev, const uint32_t *restrict tc,
                                const int32_t *restrict node, const int32_t *restrict prv, const int32_t *restrict eq,
                                const int32_t *restrict sg, const int32_t *restrict sgl, const wsplit_t *restrict ws,
                                int32_t *restrict cx, int32_t *restrict s0, int32_t *restrict pr,
                                uint32_t *restrict ua) {
    const int32_t sh = 7 - depth, base = depth * 4;
    const int32_t h00 = ws->h[0][0], h01 = ws->h[0][1], h02 = ws->h[0][2], h03 = ws->h[0][3] * 256;
    const int32_t h10 = ws->h[1][0], h11 = ws->h[1][1], h12 = ws->h[1][2], h13 = ws->h[1][3] * 256;
    const int32_t l00 = ws->l[0][0], l01 = ws->l[0][1], l02 = ws->l[0][2], l03 = ws->l[0][3] * 256;
    const int32_t l10 = ws->l[1][0], l11 = ws->l[1][1], l12 = ws->l[1][2], l13 = ws->l[1][3] * 256;
    for (int32_t c = 0; c < n; c++) {
        int32_t e = eq[c], nd = node[c], x = (base + e * 2 + ((prv[c] >> sh) & 1)) * has_prev;
        uint32_t ta = tc[c * 256 + nd];
        int32_t a = STP[ta >> 12], g = sg[x], h = sgl[nd];
        int32_t hi = (e ? h10 : h00) * a + (e ? h11 : h01) * g + (e ? h12 : h02) * h + (e ? h13 : h03);
        int32_t lo = (e ? l10 : l00) * a + (e ? l11 : l01) * g + (e ? l12 : l02) * h + (e ? l13 : l03);
        int32_t d = hi + asr32(lo, 16);
        d = d < -2048 ? -2048 : d;
        d = d > 2048 ? 2048 : d;
        ua[c] = ta;
        cx[c] = x;
        s0[c] = a;
        pr[c] = SQI[d + 2048];
    }
}

/* mixer gradient of one depth: grad[e][k] = sum over the channels with eq == e of s_k * err, exact: int32
 * sums over blocks of 32 channels (|s_k err| <= 2047 * 24570, 32 of them < 2^31), added up in int64 */
ALWAYS_INLINE void grad_pass(int32_t n, const int32_t *restrict eq, const int32_t *restrict node,
                             const int32_t *restrict cx, const int32_t *restrict s0, const int32_t *restrict pr,
                             const int32_t *restrict bits, const int32_t *restrict sg, const int32_t *restrict sgl,
                             int64_t grad[2][NIN]) {
    int64_t t[2][NIN] = {{0}};
    for (int32_t c0 = 0; c0 < n; c0 += 32) {
        const int32_t end = n - c0 < 32 ? n : c0 + 32;
        int32_t g00 = 0, g01 = 0, g02 = 0, g03 = 0, g10 = 0, g11 = 0, g12 = 0, g13 = 0;
        for (int32_t c = c0; c < end; c++) {
            int32_t err = ((bits[c] << 12) - pr[c]) * 6, e1 = eq[c] ? err : 0, e0 = err - e1;
            int32_t a = s0[c], g = sg[cx[c]], h = sgl[node[c]];
            g00 += a * e0; g01 += g * e0; g02 += h * e0; g03 += e0;
            g10 += a * e1; g11 += g * e1; g12 += h * e1; g13 += e1;
        }
        t[0][0] += g00; t[0][1] += g01; t[0][2] += g02; t[0][3] += g03;
        t[1][0] += g10; t[1][1] += g11; t[1][2] += g12; t[1][3] += g13;
    }
    for (int e = 0; e < 2; e++) {
        for (int k = 0; k < NIN - 1; k++) grad[e][k] = t[e][k];
        grad[e][NIN - 1] = t[e][NIN - 1] * 256;
    }
}

/* depth pass 3a: update the channel counter states read by the predictions (ua), the next bit-tree node,
 * prefix-equals-reference, and the sums that give the shared reference counters' batch */
ALWAYS_INLINE void update_pass(int32_t n, int32_t depth, const int32_t *restrict prv, const int32_t *restrict bits,
                               int32_t *restrict node, int32_t *restrict eq, uint32_t *restrict ua, int32_t sums[7]) {
    const int32_t sh = 7 - depth;
    int32_t se = 0, sp = 0, sep = 0, sb = 0, seb = 0, spb = 0, sepb = 0;
    for (int32_t c = 0; c < n; c++) {
        int32_t bit = bits[c], nd = node[c], e = eq[c], pb = (prv[c] >> sh) & 1;
        ua[c] = ctr_upd_ch(ua[c], bit);
        se += e; sp += pb; sep += e & pb; sb += bit; seb += e & bit; spb += pb & bit; sepb += e & pb & bit;
        eq[c] = e & (bit == pb);
        node[c] = nd * 2 + bit;
    }
    sums[0] = se; sums[1] = sp; sums[2] = sep; sums[3] = sb; sums[4] = seb; sums[5] = spb; sums[6] = sepb;
}
/* depth pass 3b: store them (the nodes are the next depth's: the updated counter sits at node >> 1) */
ALWAYS_INLINE void store_pass(int32_t n, uint32_t *restrict tc, const int32_t *restrict node,
                              const uint32_t *restrict ua) {
    for (int32_t c = 0; c < n; c++) tc[c * 256 + (node[c] >> 1)] = ua[c];
}

/* The hi bytes of a literal row (hi_row; the encoder reads them, the decoder writes them) given the
 * reference row's hi bytes ref (NULL for row 0) and the row's centres in m->ctr. */
ALWAYS_INLINE void literal_hi_body(model_t *m, rc_t *r, int enc, uint8_t *hi_row, const uint8_t *ref) {
    const size_t C = m->C;
    const int32_t has_prev = ref != NULL, n = (int32_t)C;
    for (size_t c = 0; c < C; c++) {
        int32_t s0 = enc ? hi_row[c] : 0, p0 = has_prev ? ref[c] : 0, ctr = m->ctr[c];
        m->sym[c] = (s0 & 128) | ((s0 - ctr + 64) & 127);
        m->prv[c] = (p0 & 128) | ((p0 - ctr + 64) & 127);
        m->node[c] = 1;
        m->eq[c] = 1;
    }
    for (int32_t depth = 0; depth < 8; depth++) {
        int32_t sg[32], sgl[256], s[7];
        int64_t grad[2][NIN];
        wsplit_t ws;
        for (int i = 0; i < 32; i++) sg[i] = ST[p12(m->t_gprev[i])];
        for (int i = 1 << depth; i < 2 << depth; i++) sgl[i] = ST[p12(m->t_glob[i])];
        for (int e = 0; e < 2; e++)
            for (int k = 0; k < NIN; k++) {
                int32_t w = m->w[depth * 2 + e][k];
                ws.l[e][k] = (int32_t)((uint32_t)w & 0xFFFFu);
                ws.h[e][k] = asr32(w, 16);
            }
        predict_pass(n, depth, has_prev, m->t_chan, m->node, m->prv, m->eq, sg, sgl, &ws, m->cx, m->s0, m->pr,
                     m->ua);
        if (enc) rc_encode_pass(r, m->pr, m->sym, m->bits, C, 7 - depth);
        else rc_decode_pass(r, m->pr, m->bits, C);
        grad_pass(n, m->eq, m->node, m->cx, m->s0, m->pr, m->bits, sg, sgl, grad);
        update_pass(n, depth, m->prv, m->bits, m->node, m->eq, m->ua, s);
        store_pass(n, m->t_chan, m->node, m->ua);
        /* the shared reference counters of this depth: one update per context toward the batch's frequency of 1s
         * (contexts (e, pbit) from the sums of e, pbit, e pbit and the same times the bit; row 0: context 0) */
        if (has_prev) {
            const int64_t nb[4] = {n - s[0] - s[1] + s[2], s[1] - s[2], s[0] - s[2], s[2]};
            const int64_t kb[4] = {s[3] - s[4] - s[5] + s[6], s[5] - s[6], s[4] - s[6], s[6]};
            for (int i = 0; i < 4; i++) m->t_gprev[depth * 4 + i] = batch_upd(m->t_gprev[depth * 4 + i], nb[i], kb[i]);
        } else {
            m->t_gprev[0] = batch_upd(m->t_gprev[0], n, s[3]);
        }
        for (int e = 0; e < 2; e++)
            for (int k = 0; k < NIN; k++) {
                int32_t *w = &m->w[depth * 2 + e][k];
                *w = clamp32((int64_t)*w + asr64(grad[e][k] + (1 << (BATCH_SHIFT - 1)), BATCH_SHIFT),
                             -(1 << 24), 1 << 24);
            }
    }
    /* the shared bit-tree: each node is read at its own depth only, so its batch update (all the channels
     * that passed it, the 1s those that went right) can wait for the end of the row: subtree counts */
    int32_t cnt[512] = {0}, cnt2[256] = {0};
    for (size_t c = 0; c + 1 < C; c += 2) { cnt[m->node[c]]++; cnt2[m->node[c + 1] - 256]++; }
    if (C & 1) cnt[m->node[C - 1]]++;
    for (int i = 0; i < 256; i++) cnt[256 + i] += cnt2[i];
    for (int i = 255; i >= 1; i--) cnt[i] = cnt[2 * i] + cnt[2 * i + 1];
    for (int i = 1; i < 256; i++) m->t_glob[i] = batch_upd(m->t_glob[i], cnt[i], cnt[2 * i + 1]);
    if (!enc)
        for (size_t c = 0; c < C; c++)
            hi_row[c] = (uint8_t)((m->node[c] & 128) | (((m->node[c] & 127) + m->ctr[c] - 64) & 127));
}

typedef void (*literal_hi_fn)(model_t *, rc_t *, int, uint8_t *, const uint8_t *);
static void literal_hi_plain(model_t *m, rc_t *r, int enc, uint8_t *hi_row, const uint8_t *ref) {
    literal_hi_body(m, r, enc, hi_row, ref);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_AVX2_COPY 1
__attribute__((target("avx2"))) static void literal_hi_avx2(model_t *m, rc_t *r, int enc, uint8_t *hi_row,
                                                            const uint8_t *ref) {
    literal_hi_body(m, r, enc, hi_row, ref);
}
#else
#define HAVE_AVX2_COPY 0
#endif
static literal_hi_fn literal_hi_impl = literal_hi_plain; /* the AVX2 copy where the CPU has it: PyInit, _use_avx2 */

/* The centres of row t: the rounded mean floor((csum + t/2) / t) of each channel's earlier centred bytes
 * (0..127), 56 for row 0. The quotient comes from a double estimate corrected to the exact integer. */
static void row_centres(model_t *m, size_t t) {
    const size_t C = m->C;
    if (!t) { for (size_t c = 0; c < C; c++) m->ctr[c] = 56; return; }
    const double inv = 1.0 / (double)t;
    const int64_t tt = (int64_t)t;
    for (size_t c = 0; c < C; c++) {
        int64_t num = m->csum[c] + tt / 2, q = (int64_t)((double)num * inv);
        q -= q * tt > num;
        q += (q + 1) * tt <= num;
        m->ctr[c] = (int32_t)q;
    }
}

/* Residuals of a RoPE-matched row against m->pred: per channel a zero flag (context: the previous
 * channel's flag), a sign, the magnitude's bit length in unary (adaptive per step), the bit below the top
 * one adaptive (per length), the rest equiprobable. Returns -1 (decoder) for a value out of range. */
static int code_residuals(model_t *m, rc_t *r, int enc, uint16_t *row) {
    int lastz = 0;
    for (size_t c = 0; c < m->C; c++) {
        int32_t po = ordinal(m->pred[c]);
        int32_t res = enc ? ordinal(row[c]) - po : 0;
        int zero = code_flag(r, enc, &m->t_rz[lastz], res == 0);
        lastz = zero;
        if (!zero) {
            int neg = code_flag(r, enc, &m->t_rs[0], res < 0);
            uint32_t mag = (uint32_t)(res < 0 ? -res : res);
            int nb = bit_length(mag), q = 1;
            while (q < RES_LEN_MAX) {
                if (!code_flag(r, enc, &m->t_ru[q], nb > q)) break;
                q++;
            }
            uint32_t mm = 1;
            for (int k = q - 2; k >= 0; k--) {
                int b = (int)((mag >> k) & 1);
                if (k == q - 2) b = code_flag(r, enc, &m->t_rl[q], b);
                else b = rc_bit(r, enc, 2048, b);
                mm = (mm << 1) | (uint32_t)b;
            }
            res = neg ? -(int32_t)mm : (int32_t)mm;
        }
        if (!enc) {
            int32_t o = po + res;
            if (o < -32768 || o > 32767) return -1;
            row[c] = from_ordinal(o);
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- encoder searches */
static uint64_t row_hash(const uint16_t *row, size_t C) {
    uint64_t h = 0x9E3779B97F4A7C15ull;
    for (size_t c = 0; c < C; c++) h = (h ^ row[c]) * 0x100000001B3ull;
    return h ^ (h >> 29);
}
/* equal bytes of a and b: 8-bit counts over blocks of 255 (the vectoriser keeps them in byte lanes) */
ALWAYS_INLINE uint32_t count_equal(const uint8_t *restrict a, const uint8_t *restrict b, size_t C) {
    uint32_t n = 0;
    for (size_t c0 = 0; c0 < C; c0 += 255) {
        const size_t end = C - c0 < 255 ? C : c0 + 255;
        uint8_t k = 0;
        for (size_t c = c0; c < end; c++) k = (uint8_t)(k + (a[c] == b[c]));
        n += k;
    }
    return n;
}
/* cost estimate of coding row v against its prediction w as a residual (bits ~ 2 bit_length + 1) */
static inline uint64_t residual_bits(uint16_t v, uint16_t w) {
    int32_t d = ordinal(v) - ordinal(w);
    return d ? (uint64_t)(2 * bit_length((uint32_t)(d < 0 ? -d : d)) + 1) : 1;
}
/* the residual cost of row against src rotated by the angles cs (as rope_predict), or any value >= limit
 * once it reaches limit (the sum only grows, so the exact cost is returned whenever it is below limit) */
static uint64_t rope_cost(const rope_t *rp, const double *cs, const uint16_t *src, const uint16_t *row,
                          uint64_t limit) {
    uint64_t cost = 0;
    for (int h = 0; h < rp->heads; h++) {
        const uint16_t *x = src + (size_t)h * rp->dim, *y = row + (size_t)h * rp->dim;
        for (int i = 0; i < rp->half; i++) {
            int da, db;
            pair_dims(rp, i, &da, &db);
            double a = F16[x[da]], b = F16[x[db]], c = cs[i], s = cs[rp->half + i];
            cost += residual_bits(y[da], f64_to_f16(a * c - b * s)) + residual_bits(y[db], f64_to_f16(a * s + b * c));
            if (cost >= limit) return cost;
        }
    }
    return cost;
}

typedef struct {
    const uint16_t *words; /* [seq * C] encoder input / decoder output */
    uint8_t *hi;           /* [seq * C] */
    int32_t *match, *rope, *ref; /* [seq] -1: none */
    const int64_t *pos;    /* [seq] positions relative to row 0 */
    size_t seq, C;
} rows_t;

/* sketch of each row (encoder only): the sign bits of the row de-rotated to position 0, pair p's two
 * dims at bits p and P + p (P = C / 2 pairs; any fixed bit order gives the same Hamming distances).
 * pa, pb, pf: [P] scratch; g: [C] scratch. */
static void rope_sketch(const rows_t *R, rope_t *rp, uint64_t *sk, size_t words_per, int32_t *pa, int32_t *pb,
                        int32_t *pf, uint8_t *g) {
    const int32_t P = rp->heads * rp->half, half = rp->half;
    for (int32_t h = 0, p = 0; h < rp->heads; h++)
        for (int32_t i = 0; i < half; i++, p++) {
            int da, db;
            pair_dims(rp, i, &da, &db);
            pa[p] = h * rp->dim + da;
            pb[p] = h * rp->dim + db;
            pf[p] = i;
        }
    for (size_t t = 0; t < R->seq; t++) {
        const double *cs = rope_angles(rp, R->pos[t]); /* de-rotation by -pos: the same cos, minus the sin */
        const uint16_t *row = R->words + t * R->C;
        for (int32_t p = 0; p < P; p++) {
            double a = F16[row[pa[p]]], b = F16[row[pb[p]]], c = cs[pf[p]], sn = cs[half + pf[p]];
            g[p] = a * c + b * sn < 0;
            g[P + p] = b * c - a * sn < 0;
        }
        uint64_t *s = sk + t * words_per;
        for (size_t k = 0; k < words_per; k++) {
            const size_t lim = R->C - 64 * k < 64 ? R->C - 64 * k : 64;
            uint64_t w = 0;
            for (size_t b = 0; b < lim; b++) w |= (uint64_t)g[64 * k + b] << b;
            s[k] = w;
        }
    }
}

/* Encoder searches look back at most SEARCH_WINDOW rows (the runtime's windows and the online-sim's chunks are far
 * shorter), so that encoding stays linear in seq for long tensors; the format does not depend on it. */
#define SEARCH_WINDOW 1024

/* for each row t >= 1 that is no exact repeat: the ROPE_CANDIDATES earlier rows of the last SEARCH_WINDOW with the
 * nearest sketches (Hamming distance; ties: the earliest row) whose distance is at most C / ROPE_SKETCH_DIV, into
 * cand[t * ROPE_CANDIDATES + k] (-1: none) */
ALWAYS_INLINE void sketch_scan_body(const rows_t *R, const uint64_t *sk, size_t words_per, int32_t *cand) {
    const uint32_t dmax = (uint32_t)(R->C / ROPE_SKETCH_DIV);
    for (size_t t = 0; t < R->seq; t++) {
        int32_t *best = cand + t * ROPE_CANDIDATES;
        uint32_t bestd[ROPE_CANDIDATES];
        for (int k = 0; k < ROPE_CANDIDATES; k++) { best[k] = -1; bestd[k] = dmax + 1; }
        if (R->match[t] >= 0) continue;
        const uint64_t *st = sk + t * words_per;
        for (size_t j = t > SEARCH_WINDOW ? t - SEARCH_WINDOW : 0; j < t; j++) {
            const uint64_t *sj = sk + j * words_per;
            uint32_t d = 0;
            for (size_t k = 0; k < words_per; k++) d += popcount64(st[k] ^ sj[k]);
            if (d >= bestd[ROPE_CANDIDATES - 1]) continue;
            int k = ROPE_CANDIDATES - 1;
            for (; k > 0 && d < bestd[k - 1]; k--) { bestd[k] = bestd[k - 1]; best[k] = best[k - 1]; }
            bestd[k] = d;
            best[k] = (int32_t)j;
        }
    }
}

/* the row t >= 2 (literal so far) takes as reference the earlier row j < t-1 (of the last SEARCH_WINDOW) sharing the
 * most hi bytes (ties: the earliest) if it shares REF_MARGIN more than row t-1 */
ALWAYS_INLINE void ref_search_body(rows_t *R) {
    const size_t C = R->C;
    for (size_t t = 2; t < R->seq; t++) {
        if (R->match[t] >= 0 || R->rope[t] >= 0) continue;
        const uint8_t *h = R->hi + t * C;
        uint32_t prev = count_equal(h, R->hi + (t - 1) * C, C), best = 0;
        size_t bj = 0;
        for (size_t j = t > SEARCH_WINDOW + 1 ? t - 1 - SEARCH_WINDOW : 0; j + 1 < t; j++) {
            uint32_t n = count_equal(h, R->hi + j * C, C);
            if (n > best) { best = n; bj = j; }
        }
        if (best >= prev + REF_MARGIN) R->ref[t] = (int32_t)bj;
    }
}

static void sketch_scan_plain(const rows_t *R, const uint64_t *sk, size_t words_per, int32_t *cand) {
    sketch_scan_body(R, sk, words_per, cand);
}
static void ref_search_plain(rows_t *R) { ref_search_body(R); }
#if HAVE_AVX2_COPY
__attribute__((target("avx2,popcnt"))) static void sketch_scan_avx2(const rows_t *R, const uint64_t *sk,
                                                                     size_t words_per, int32_t *cand) {
    sketch_scan_body(R, sk, words_per, cand);
}
__attribute__((target("avx2,popcnt"))) static void ref_search_avx2(rows_t *R) { ref_search_body(R); }
#endif
static void (*sketch_scan_impl)(const rows_t *, const uint64_t *, size_t, int32_t *) = sketch_scan_plain;
static void (*ref_search_impl)(rows_t *) = ref_search_plain; /* set with literal_hi_impl */

/* RoPE matches: each candidate of the sketch scan verified with the exact prediction; the cheapest
 * below ROPE_BITS_PER_CH bits a channel wins (ties: the nearer sketch) */
static void rope_search(rows_t *R, rope_t *rp, const int32_t *cand) {
    const size_t C = R->C;
    for (size_t t = 1; t < R->seq; t++) {
        uint64_t bestc = (uint64_t)ROPE_BITS_PER_CH * C;
        for (int k = 0; k < ROPE_CANDIDATES; k++) {
            int32_t j = cand[t * ROPE_CANDIDATES + k];
            if (j < 0) continue;
            const double *cs = rope_angles(rp, R->pos[t] - R->pos[j]);
            uint64_t cost = rope_cost(rp, cs, R->words + (size_t)j * C, R->words + t * C, bestc);
            if (cost < bestc) { bestc = cost; R->rope[t] = j; }
        }
    }
}

static int match_search(rows_t *R) {
    size_t cap = 16;
    while (cap < 2 * R->seq) cap *= 2;
    int64_t *slot = (int64_t *)malloc(cap * sizeof(int64_t));
    if (!slot) return -1;
    for (size_t i = 0; i < cap; i++) slot[i] = -1;
    for (size_t t = 0; t < R->seq; t++) {
        const uint16_t *row = R->words + t * R->C;
        size_t i = (size_t)row_hash(row, R->C) & (cap - 1);
        for (;; i = (i + 1) & (cap - 1)) {
            if (slot[i] < 0) { slot[i] = (int64_t)t; break; }
            if (memcmp(R->words + (size_t)slot[i] * R->C, row, R->C * 2) == 0) { R->match[t] = (int32_t)slot[i]; break; }
        }
    }
    free(slot);
    return 0;
}

/* ---------------------------------------------------------------- the shared coding loop */
/* enc: code R (searches done) into r, lo bytes into lo. dec: rebuild words/hi from r and lo.
 * Returns 0, or an error message (decoder). literal_rows receives the literal row count. */
static const char *code_rows(int enc, rows_t *R, rope_t *rp, model_t *m, rc_t *r, uint8_t *lo, size_t lo_len,
                             size_t *literal_rows) {
    const size_t C = R->C, seq = R->seq;
    uint16_t *words = (uint16_t *)R->words;
    int prev_match = 0, prev_rope = 0, prev_ref = 0;
    size_t lo_pos = 0;
    for (size_t t = 0; t < seq; t++) {
        uint16_t *row = words + t * C;
        uint8_t *hi = R->hi + t * C;
        int done = 0;
        if (t >= 1) {
            int bit = code_flag(r, enc, &m->t_match[prev_match], enc ? R->match[t] >= 0 : 0);
            prev_match = bit;
            if (bit) {
                uint32_t j = rc_index(r, enc, bit_length((uint32_t)(t - 1)), enc ? (uint32_t)R->match[t] : 0);
                if (j >= t) return "exact-match row index out of range";
                if (!enc) { memcpy(row, words + (size_t)j * C, C * 2); memcpy(hi, R->hi + (size_t)j * C, C); }
                done = 1;
            }
        }
        if (!done && rp->on && t >= 1) {
            int bit = code_flag(r, enc, &m->t_rope[prev_rope], enc ? R->rope[t] >= 0 : 0);
            prev_rope = bit;
            if (bit) {
                uint32_t j = rc_index(r, enc, bit_length((uint32_t)(t - 1)), enc ? (uint32_t)R->rope[t] : 0);
                if (j >= t) return "RoPE-match row index out of range";
                rope_predict(rp, rope_angles(rp, R->pos[t] - R->pos[j]), words + (size_t)j * C, m->pred);
                if (code_residuals(m, r, enc, row) < 0) return "RoPE residual out of the fp16 range";
                if (!enc) for (size_t c = 0; c < C; c++) hi[c] = (uint8_t)(row[c] >> 8);
                done = 1;
            }
        }
        if (!done) {
            size_t rj = t - 1;
            if (t >= 2) {
                int bit = code_flag(r, enc, &m->t_ref[prev_ref], enc ? R->ref[t] >= 0 : 0);
                prev_ref = bit;
                if (bit) {
                    uint32_t j = rc_index(r, enc, bit_length((uint32_t)(t - 2)), enc ? (uint32_t)R->ref[t] : 0);
                    if (j > t - 2) return "reference row index out of range";
                    rj = j;
                }
            }
            row_centres(m, t);
            literal_hi_impl(m, r, enc, hi, t ? R->hi + rj * C : NULL);
            if (lo_pos + C > lo_len) return "more literal rows than lo bytes";
            if (enc) for (size_t c = 0; c < C; c++) lo[lo_pos + c] = (uint8_t)row[c];
            else for (size_t c = 0; c < C; c++) row[c] = (uint16_t)(((uint16_t)hi[c] << 8) | lo[lo_pos + c]);
            lo_pos += C;
        }
        for (size_t c = 0; c < C; c++) m->csum[c] += hi[c] & 127;
        if (r[0].oom || r[1].oom) return "out of memory";
        if (!enc && r[0].pos + r[1].pos > r[0].cap + 8) return "range-coded stream truncated";
    }
    *literal_rows = C ? lo_pos / C : 0;
    if (!enc && lo_pos != lo_len) return "fewer literal rows than lo bytes";
    return NULL;
}

/* ---------------------------------------------------------------- Python glue */
static int parse_rope(rope_t *rp, int on, double theta, int interleaved, size_t heads, size_t dim, size_t seq) {
    memset(rp, 0, sizeof *rp);
    if (!on) return 0;
    rp->on = 1;
    rp->interleaved = interleaved;
    rp->heads = (int)heads;
    rp->dim = (int)dim;
    rp->half = (int)dim / 2;
    size_t h = rp->half ? (size_t)rp->half : 1;
    rp->inv_freq = (double *)malloc(h * sizeof(double));
    rp->cs = (double *)malloc(2 * h * sizeof(double));
    rp->memo_len = ROPE_MEMO_BYTES / (2 * h * sizeof(double));
    rp->memo_len = seq < rp->memo_len ? seq : rp->memo_len;
    rp->memo = (double *)malloc((rp->memo_len ? rp->memo_len : 1) * 2 * h * sizeof(double));
    rp->memo_ok = (uint8_t *)calloc(rp->memo_len ? rp->memo_len : 1, 1);
    if (!rp->inv_freq || !rp->cs || !rp->memo || !rp->memo_ok) return -1;
    rope_freqs(theta, rp->dim, rp->inv_freq);
    return 0;
}
static void rope_free(rope_t *rp) { free(rp->inv_freq); free(rp->cs); free(rp->memo); free(rp->memo_ok); }

static int check_shape(Py_ssize_t seq, Py_ssize_t heads, Py_ssize_t dim, int rope_on, double theta) {
    if (seq < 0 || heads < 0 || dim < 0 || seq > 0xFFFFFFFFL || heads > 0xFFFF || dim > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "shape out of range");
        return -1;
    }
    if ((size_t)heads * (size_t)dim > MAX_CHANNELS) {
        PyErr_Format(PyExc_ValueError, "kv_heads * head_dim = %zd channels, the ratio profile takes at most %d",
                     heads * dim, MAX_CHANNELS);
        return -1;
    }
    if (rope_on && (dim % 2 || !(theta > 1.0 && theta <= DBL_MAX))) {
        PyErr_SetString(PyExc_ValueError, "RoPE matching needs an even head_dim and a finite theta > 1");
        return -1;
    }
    return 0;
}

/* encode(words, seq, heads, dim, rope_on, theta, interleaved, positions_or_None)
 * -> (stream, lo, n_match, n_rope, n_ref) */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer wb, pb = {0};
    Py_ssize_t seq, heads, dim;
    int rope_on, interleaved;
    double theta;
    PyObject *posobj;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnpdpO", &wb, &seq, &heads, &dim, &rope_on, &theta, &interleaved, &posobj))
        return NULL;
    PyObject *result = NULL;
    const char *err = NULL;
    size_t C = (size_t)heads * (size_t)dim, n = (size_t)seq * C;
    rows_t R = {0};
    rope_t rp = {0};
    model_t m;
    int model_ok = 0;
    rc_t r[2] = {{0, 0xFFFFFFFFu, 0, 0, 1, NULL, 0, 0, 0, 0, 0}, {0, 0xFFFFFFFFu, 0, 0, 1, NULL, 0, 0, 0, 0, 0}};
    uint8_t *lo = NULL, *stream = NULL;
    size_t len0 = 0, len1 = 0;
    uint64_t *sk = NULL;
    int32_t *cand = NULL, *pidx = NULL;
    int64_t *pos = NULL;
    size_t literal = 0;
    if (check_shape(seq, heads, dim, rope_on, theta) < 0) goto done;
    if ((size_t)wb.len != n * 2) { PyErr_SetString(PyExc_ValueError, "words buffer size does not match the shape"); goto done; }
    if (posobj != Py_None) {
        if (PyObject_GetBuffer(posobj, &pb, PyBUF_SIMPLE) < 0) goto done;
        if ((size_t)pb.len != (size_t)seq * 8) { PyErr_SetString(PyExc_ValueError, "positions size does not match seq"); goto done; }
    }
    R.seq = (size_t)seq; R.C = C; R.words = (const uint16_t *)wb.buf;
    R.hi = (uint8_t *)malloc(n ? n : 1);
    R.match = (int32_t *)malloc((R.seq ? R.seq : 1) * sizeof(int32_t));
    R.rope = (int32_t *)malloc((R.seq ? R.seq : 1) * sizeof(int32_t));
    R.ref = (int32_t *)malloc((R.seq ? R.seq : 1) * sizeof(int32_t));
    pos = (int64_t *)malloc((R.seq ? R.seq : 1) * sizeof(int64_t));
    lo = (uint8_t *)malloc(n ? n : 1);
    size_t words_per = (C + 63) / 64;
    sk = (uint64_t *)malloc((R.seq * words_per > 0 ? R.seq * words_per : 1) * 8);
    cand = (int32_t *)malloc((R.seq ? R.seq : 1) * ROPE_CANDIDATES * sizeof(int32_t));
    pidx = (int32_t *)malloc((C ? C : 1) * 3 * sizeof(int32_t)); /* rope_sketch's pa, pb, pf: C / 2 each */
    if (!R.hi || !R.match || !R.rope || !R.ref || !pos || !lo || !sk || !cand || !pidx || model_init(&m, C ? C : 1) < 0 ||
        parse_rope(&rp, rope_on, theta, interleaved, (size_t)heads, (size_t)dim, (size_t)seq) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    model_ok = 1;
    m.C = C;
    for (size_t t = 0; t < R.seq; t++) {
        R.match[t] = R.rope[t] = R.ref[t] = -1;
        pos[t] = pb.buf ? ((const int64_t *)pb.buf)[t] : (int64_t)t;
    }
    R.pos = pos;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < n; i++) R.hi[i] = (uint8_t)(R.words[i] >> 8);
    if (C && match_search(&R) < 0) err = "out of memory";
    if (!err && C && rp.on) {
        rope_sketch(&R, &rp, sk, words_per, pidx, pidx + C / 2, pidx + C, lo); /* lo: [C] scratch until coded */
        sketch_scan_impl(&R, sk, words_per, cand);
        rope_search(&R, &rp, cand);
    }
    if (!err && C) ref_search_impl(&R);
    if (!err && C) err = code_rows(1, &R, &rp, &m, r, lo, n, &literal);
    if (!err && C) for (int k = 0; k < 2; k++) for (int i = 0; i < 5; i++) shift_low(&r[k]);
    if (!err && (r[0].oom || r[1].oom)) err = "out of memory";
    /* the stream: coder 0's bytes, then coder 1's reversed (its decoder reads from the end). LZMA's first
     * byte is always 0 (low + range never carries into it): it is not stored. */
    len0 = r[0].pos ? r[0].pos - 1 : 0;
    len1 = r[1].pos ? r[1].pos - 1 : 0;
    if (!err && !(stream = (uint8_t *)malloc(len0 + len1 + 1))) err = "out of memory";
    if (!err) {
        if (len0) memcpy(stream, r[0].buf + 1, len0);
        for (size_t i = 0; i < len1; i++) stream[len0 + i] = r[1].buf[len1 - i];
    }
    Py_END_ALLOW_THREADS
    if (err) { PyErr_SetString(PyExc_MemoryError, err); goto done; }
    size_t nm = 0, nr = 0, nf = 0;
    for (size_t t = 0; t < R.seq; t++) { nm += R.match[t] >= 0; nr += R.match[t] < 0 && R.rope[t] >= 0; nf += R.ref[t] >= 0; }
    result = Py_BuildValue("(y#y#nnn)", (const char *)stream, (Py_ssize_t)(len0 + len1), (const char *)lo, (Py_ssize_t)(literal * C), (Py_ssize_t)nm, (Py_ssize_t)nr, (Py_ssize_t)nf);
done:
    free(R.hi); free(R.match); free(R.rope); free(R.ref); free(pos); free(lo); free(sk); free(cand); free(pidx); free(r[0].buf); free(r[1].buf);
    free(stream);
    if (model_ok) model_free(&m);
    rope_free(&rp);
    PyBuffer_Release(&wb);
    if (pb.buf) PyBuffer_Release(&pb);
    return result;
}

/* decode(stream, lo, seq, heads, dim, rope_on, theta, interleaved, positions_or_None, out)
 * writes the words into the writable buffer out (seq * heads * dim * 2 bytes); returns
 * (n_match, n_rope, n_ref). Raises ValueError with what is wrong for a defective stream. */
static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer sb, lb, ob, pb = {0};
    Py_ssize_t seq, heads, dim;
    int rope_on, interleaved;
    double theta;
    PyObject *posobj;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*y*nnnpdpOw*", &sb, &lb, &seq, &heads, &dim, &rope_on, &theta, &interleaved,
                          &posobj, &ob))
        return NULL;
    PyObject *result = NULL;
    const char *err = NULL;
    size_t C = (size_t)heads * (size_t)dim, n = (size_t)seq * C, literal = 0;
    rows_t R = {0};
    rope_t rp = {0};
    model_t m;
    int model_ok = 0;
    rc_t r[2] = {{0, 0xFFFFFFFFu, 0, 0, 1, (uint8_t *)sb.buf, 0, (size_t)sb.len, 0, 0, 0},
                 {0, 0xFFFFFFFFu, 0, 0, 1, (uint8_t *)sb.buf, 0, (size_t)sb.len, 0, 0, 1}};
    int64_t *pos = NULL;
    if (check_shape(seq, heads, dim, rope_on, theta) < 0) goto done;
    if ((size_t)ob.len != n * 2) { PyErr_SetString(PyExc_ValueError, "output buffer size does not match the shape"); goto done; }
    if (posobj != Py_None) {
        if (PyObject_GetBuffer(posobj, &pb, PyBUF_SIMPLE) < 0) goto done;
        if ((size_t)pb.len != (size_t)seq * 8) { PyErr_SetString(PyExc_ValueError, "positions size does not match seq"); goto done; }
    }
    if (C == 0 || seq == 0) {
        if (sb.len || lb.len) { PyErr_SetString(PyExc_ValueError, "payload bytes for an empty tensor"); goto done; }
        result = Py_BuildValue("(nnn)", (Py_ssize_t)0, (Py_ssize_t)0, (Py_ssize_t)0);
        goto done;
    }
    R.seq = (size_t)seq; R.C = C; R.words = (const uint16_t *)ob.buf;
    R.hi = (uint8_t *)malloc(n);
    R.match = (int32_t *)malloc(R.seq * sizeof(int32_t));
    R.rope = (int32_t *)malloc(R.seq * sizeof(int32_t));
    R.ref = (int32_t *)malloc(R.seq * sizeof(int32_t));
    pos = (int64_t *)malloc(R.seq * sizeof(int64_t));
    if (!R.hi || !R.match || !R.rope || !R.ref || !pos || model_init(&m, C) < 0 ||
        parse_rope(&rp, rope_on, theta, interleaved, (size_t)heads, (size_t)dim, (size_t)seq) < 0) {
        PyErr_NoMemory();
        goto done;
    }
    model_ok = 1;
    for (size_t t = 0; t < R.seq; t++) pos[t] = pb.buf ? ((const int64_t *)pb.buf)[t] : (int64_t)t;
    R.pos = pos;
    Py_BEGIN_ALLOW_THREADS
    for (int k = 0; k < 2; k++) /* after the implicit 0 byte */
        for (int i = 0; i < 4; i++) r[k].code = (r[k].code << 8) | rc_byte(&r[k]);
    err = code_rows(0, &R, &rp, &m, r, (uint8_t *)lb.buf, (size_t)lb.len, &literal);
    if (!err && (r[0].over || r[1].over || r[0].pos + r[1].pos > r[0].cap)) err = "range-coded stream truncated";
    if (!err && r[0].pos + r[1].pos < r[0].cap) err = "range-coded stream has trailing bytes";
    Py_END_ALLOW_THREADS
    if (err) { PyErr_SetString(PyExc_ValueError, err); goto done; }
    result = PyLong_FromSize_t(literal);
done:
    free(R.hi); free(R.match); free(R.rope); free(R.ref); free(pos);
    if (model_ok) model_free(&m);
    rope_free(&rp);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&lb);
    PyBuffer_Release(&ob);
    if (pb.buf) PyBuffer_Release(&pb);
    return result;
}

/* the AVX2 copies of the coder and the encoder's scans where wanted and the CPU has AVX2 (and POPCNT) */
static void select_copies(int want) {
    literal_hi_impl = literal_hi_plain;
    sketch_scan_impl = sketch_scan_plain;
    ref_search_impl = ref_search_plain;
#if HAVE_AVX2_COPY
    if (want && __builtin_cpu_supports("avx2")) literal_hi_impl = literal_hi_avx2;
    if (want && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt")) {
        sketch_scan_impl = sketch_scan_avx2;
        ref_search_impl = ref_search_avx2;
    }
#endif
}

/* _use_avx2(flag) -> bool: run the AVX2 copy of the literal coder where the CPU has one (flag true, the
 * default at import) or the plain copy (flag false; tests compare the two); returns whether AVX2 is used.
 * It swaps process-wide function pointers that coder calls read without the GIL: for tests only, never while
 * another thread codes (the two copies give the same bits, so a race would change speed, not output). */
static PyObject *py_use_avx2(PyObject *self, PyObject *arg) {
    (void)self;
    int want = PyObject_IsTrue(arg);
    if (want < 0) return NULL;
    select_copies(want);
    return PyBool_FromLong(literal_hi_impl != literal_hi_plain);
}

static PyMethodDef methods[] = {
    {"_use_avx2", py_use_avx2, METH_O, "_use_avx2(flag) -> bool: use the AVX2 copy of the coder if the CPU has it"},
    {"encode", py_encode, METH_VARARGS, "encode(words, seq, heads, dim, rope_on, theta, interleaved, positions) -> "
                                        "(stream, lo, n_match, n_rope, n_ref)"},
    {"decode", py_decode, METH_VARARGS, "decode(stream, lo, seq, heads, dim, rope_on, theta, interleaved, positions, out)"
                                        " -> literal_rows"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ratiocore",
                                    "The ratio profile's context-model coder (see ratio.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ratiocore(void) {
    init_tables();
    select_copies(1);
    return PyModule_Create(&module);
}
