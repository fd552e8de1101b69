/* fuzz_reply: fuzz the C client's reply parser (svae_parse_reply in svae_protocol.h).
 *
 *     fuzz_reply [COUNT [SEED]]     COUNT inputs (default 100000), deterministic for a SEED
 *     fuzz_reply --parse FILE       parse one frame from FILE ("-": stdin) and print the result
 *
 * Inputs, in a fixed seeded mix: (a) valid replies of every type built here byte by byte from
 * PROTOCOL.md (version 2: decode replies with and without the readout's sections), (b) those mutated: bit flips, truncations, extensions, header fields set to
 * extremes (0, 1, 2^31 - 2, 2^31, 2^32 - 1, 0xFFFF, ...), (c) decode headers whose
 * 4 * n_bins * (sum of widths) wraps around 2^32 or 2^64 to the actual body size, (d) random
 * bytes, and first of all (e) the reply of issue 12 (n_bins = 2^31, n_rates = 2^31 - 2, no
 * body; in v2 layout, with HAS_READOUT so that the size product still wraps to 0), which the old
 * parser accepted and then read 8 GiB past.
 *
 * Every input is copied to a heap block that ends where the frame ends, at a random
 * misalignment, so AddressSanitizer sees a read one byte past the frame. For each input the
 * harness checks: a valid reply parses with the fields and section offsets it was built with;
 * any accepted input satisfies the view's guarantees (every pointer and section inside the
 * frame, sections tiling the body, JSON without NUL) and every element is read; the parser
 * accepts exactly what a plain reference check written from the spec accepts. Exit 0 when all
 * held, 1 otherwise. Build it with -fsanitize=address,undefined -fno-sanitize-recover=all
 * (`make fuzz`); tests/test_c_client.py does.
 *
 * libFuzzer (clang): clang -g -O1 -fsanitize=fuzzer,address,undefined -DSVAE_LIBFUZZER fuzz_reply.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "svae_protocol.h"

/* Reply header offsets, PROTOCOL.md section 4, version 2 (written out here, not taken from the parser). */
enum { O_VERSION = 4, O_TYPE = 5, O_STATUS = 6, O_FLAGS = 7, O_SEQ = 8, O_TCLIENT = 16, O_SERVER_NS = 24,
       O_QUEUE_NS = 28, O_NBINS = 32, O_CONTENT = 36, O_STYLE = 38, O_CLASSES = 40, O_VELOCITY = 42,
       O_HISTORY = 44, O_RESERVED = 46, O_NRATES = 48, O_BODY = 52, HDR = 56, VERSION = 2 };
enum { HAS_READOUT = 0x01, RESET_APPLIED = 0x02 };  /* reply flags */
/* the readout's sections: absent without HAS_READOUT (PROTOCOL.md section 5) */
static int readout_section(size_t k) {
    return k == SVAE_SEC_ANGLE || k == SVAE_SEC_DIRECTION || k == SVAE_SEC_PROBA || k == SVAE_SEC_VELOCITY;
}
#define FRAME_CAP ((size_t)1 << 20)

#ifndef FUZZ_MAX_FAILURES
#define FUZZ_MAX_FAILURES 20  /* reports before giving up */
#endif
static unsigned long failures;
static unsigned long iteration;
static const char *category = "";

/* -- helpers ---------------------------------------------------------------------------------- */

static uint64_t rng;
static uint64_t rnd(void) {  /* splitmix64 */
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t below(uint64_t n) { return n ? rnd() % n : 0; }

static void put16(unsigned char *p, uint64_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void put32(unsigned char *p, uint64_t v) { put16(p, v); put16(p + 2, v >> 16); }
static void put64(unsigned char *p, uint64_t v) { put32(p, v); put32(p + 4, v >> 32); }
static uint64_t get16(const unsigned char *p) { return (uint64_t)p[0] | (uint64_t)p[1] << 8; }
static uint64_t get32(const unsigned char *p) { return get16(p) | get16(p + 2) << 16; }
static uint64_t get64(const unsigned char *p) { return get32(p) | get32(p + 4) << 32; }

static void dump(const unsigned char *p, size_t len) {
    size_t i, n = len < 96 ? len : 96;
    fprintf(stderr, "  input (%zu bytes):", len);
    for (i = 0; i < n; i++) fprintf(stderr, "%s%02x", i % 16 ? " " : "\n    ", p[i]);
    fprintf(stderr, "%s\n", n < len ? " ..." : "");
}

#define CHECK(cond, p, len)                                                                        \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "FAIL input %lu (%s): %s (line %d)\n", iteration, category, #cond, __LINE__); \
            dump(p, len);                                                                          \
            if (++failures >= FUZZ_MAX_FAILURES) { fprintf(stderr, "too many failures\n"); exit(1); }             \
            return;                                                                                \
        }                                                                                          \
    } while (0)

static const char *code_name(int rc) {
    switch (rc) {
    case SVAE_OK: return "SVAE_OK";
    case SVAE_E_ARG: return "SVAE_E_ARG";
    case SVAE_E_SHORT: return "SVAE_E_SHORT";
    case SVAE_E_MAGIC: return "SVAE_E_MAGIC";
    case SVAE_E_VERSION: return "SVAE_E_VERSION";
    case SVAE_E_LENGTH: return "SVAE_E_LENGTH";
    case SVAE_E_TYPE: return "SVAE_E_TYPE";
    case SVAE_E_STATUS: return "SVAE_E_STATUS";
    case SVAE_E_DIMS: return "SVAE_E_DIMS";
    case SVAE_E_OVERFLOW: return "SVAE_E_OVERFLOW";
    case SVAE_E_SIZE: return "SVAE_E_SIZE";
    case SVAE_E_BODY: return "SVAE_E_BODY";
    default: return NULL;  /* not a code the parser may return */
    }
}
#define N_CODES 23
static unsigned long by_code[N_CODES];  /* index -rc */

/* -- the reference: what the spec accepts, written plainly in 64-bit arithmetic ---------------- */

static int reference_accepts(const unsigned char *p, size_t len) {
    uint64_t type, status, nb, cd, sd, nc, vd, hb, nr, sum, body, readout;
    if (len < HDR || memcmp(p, "SVAE", 4) != 0 || p[O_VERSION] != VERSION) return 0;
    body = (uint64_t)len - HDR;
    if (get32(p + O_BODY) != body) return 0;
    type = p[O_TYPE];
    status = p[O_STATUS];
    if (type != 0x81 && type != 0x82 && type != 0x83 && type != 0x84 && type != 0xFF) return 0;
    if ((type == 0xFF) != (status != 0)) return 0;
    nb = get32(p + O_NBINS), cd = get16(p + O_CONTENT), sd = get16(p + O_STYLE), nc = get16(p + O_CLASSES);
    vd = get16(p + O_VELOCITY), hb = get16(p + O_HISTORY), nr = get32(p + O_NRATES);
    if (type == 0x81) {
        uint64_t maxw = SVAE_REPLY_MAX_WIDTH, maxb = SVAE_REPLY_MAX_BINS;
        readout = p[O_FLAGS] & HAS_READOUT;
        if (nb < 1 || nb > maxb || cd > maxw || sd > maxw || nr > maxw) return 0;
        if (!readout && (nc || vd || hb)) return 0;
        if (readout && (nc > maxw || vd > maxw)) return 0;
        sum = cd + sd + nr + (readout ? 2 + nc + vd : 0);  /* < 2^34 */
        if (sum > (UINT64_MAX / 4) / nb) return 0;     /* 4 * nb * sum > 2^64 > body */
        return 4 * nb * sum == body;
    }
    if (nb || cd || sd || nc || vd || hb || nr) return 0;
    if (type == 0x84) return body == 0;
    return memchr(p + HDR, 0, (size_t)body) == NULL;
}

/* -- the check of one input ------------------------------------------------------------------- */

typedef struct {         /* what a valid reply was built with */
    int valid, readout;
    uint8_t type, status, flags;
    uint64_t seq, t_client, server_ns, queue_ns;
    uint32_t n_bins, widths[SVAE_N_SECTIONS];  /* 0 for an absent section */
} expect_t;

static volatile uint32_t sink;

/* Parse p[0 .. len) (a heap block ending at p + len) and check everything; e may be NULL. */
static void check_parsed(const unsigned char *p, size_t len, const expect_t *e) {
    svae_reply_view v;
    int rc = svae_parse_reply(p, len, &v), ref = reference_accepts(p, len);
    size_t k, i;
    CHECK(code_name(rc) != NULL, p, len);
    by_code[-rc]++;
    CHECK(strcmp(svae_strerror(rc), "unknown error code") != 0, p, len);
    CHECK((rc == SVAE_OK) == ref, p, len);
    if (e && e->valid) {
        CHECK(rc == SVAE_OK, p, len);
        CHECK(v.header.msg_type == e->type && v.header.status == e->status && v.header.seq == e->seq, p, len);
        CHECK(v.header.t_client_ns == e->t_client && v.header.server_ns == e->server_ns, p, len);
        CHECK(v.header.queue_ns == e->queue_ns && v.header.flags == e->flags, p, len);
        CHECK(v.header.version == VERSION && memcmp(v.header.magic, "SVAE", 4) == 0, p, len);
        CHECK(svae_reply_answers(&v, (uint8_t)(e->type & 0x7F), e->n_bins) == SVAE_OK, p, len);
        if (e->type == SVAE_DECODE_REPLY) {
            size_t off = HDR;
            CHECK(v.header.n_bins == e->n_bins, p, len);
            CHECK(svae_reply_answers(&v, SVAE_DECODE, e->n_bins + 1) == SVAE_E_MISMATCH, p, len);
            CHECK(svae_reply_answers(&v, SVAE_PING, 0) == SVAE_E_MISMATCH, p, len);
            for (k = 0; k < SVAE_N_SECTIONS; k++) {
                const svae_array *a = &v.section[k];
                if (readout_section(k) && !e->readout) {  /* absent: all zero */
                    CHECK(a->data == NULL && a->rows == 0 && a->width == 0 && a->bytes == 0 && a->elem == 0, p, len);
                    continue;
                }
                CHECK(a->rows == e->n_bins && a->width == e->widths[k], p, len);
                CHECK(a->data == p + off, p, len);
                CHECK(a->elem == (k == SVAE_SEC_DIRECTION ? SVAE_ELEM_I32 : SVAE_ELEM_F32), p, len);
                for (i = 0; i < a->rows * a->width; i += 1 + i / 4) {  /* values: the bytes written */
                    float f = svae_f32(a, i);
                    int32_t n = svae_i32(a, i);
                    uint32_t uf, un, want = (uint32_t)get32(p + off + 4 * i);
                    memcpy(&uf, &f, 4);
                    memcpy(&un, &n, 4);
                    CHECK(uf == want && un == want, p, len);
                }
                off += 4 * (size_t)e->n_bins * e->widths[k];
            }
            CHECK(off == len, p, len);
        } else if (e->type == SVAE_PONG) {
            CHECK(v.json == NULL && v.body_len == 0, p, len);
        } else {
            CHECK(v.json == (const char *)p + HDR && v.json_len == len - HDR, p, len);
        }
    }
    if (rc != SVAE_OK) return;
    /* The guarantees of an accepted reply, whatever the input. */
    CHECK(v.frame == p && v.len == len && v.body == p + HDR && v.body_len == len - HDR, p, len);
    CHECK(v.header.body_bytes == v.body_len, p, len);
    CHECK(v.header.seq == get64(p + O_SEQ) && v.header.t_client_ns == get64(p + O_TCLIENT), p, len);
    CHECK(v.header.server_ns == get32(p + O_SERVER_NS) && v.header.n_bins == get32(p + O_NBINS), p, len);
    CHECK(v.header.queue_ns == get32(p + O_QUEUE_NS), p, len);
    CHECK(v.header.content_dim == get16(p + O_CONTENT) && v.header.style_dim == get16(p + O_STYLE), p, len);
    CHECK(v.header.n_classes == get16(p + O_CLASSES) && v.header.reserved == get16(p + O_RESERVED), p, len);
    CHECK(v.header.velocity_dim == get16(p + O_VELOCITY) && v.header.history_bins == get16(p + O_HISTORY), p, len);
    CHECK(v.header.n_rates == get32(p + O_NRATES) && v.header.flags == p[O_FLAGS], p, len);
    CHECK(v.header.msg_type == p[O_TYPE] && v.header.status == p[O_STATUS], p, len);
    CHECK(svae_view_aligned(&v) == (((uintptr_t)p & 3u) == 0), p, len);
    if (v.header.msg_type == SVAE_DECODE_REPLY) {
        const unsigned char *end = v.body;
        int readout = (v.header.flags & HAS_READOUT) != 0;
        CHECK(v.header.n_bins >= 1 && v.json == NULL, p, len);
        for (k = 0; k < SVAE_N_SECTIONS; k++) {
            const svae_array *a = &v.section[k];
            uint64_t bytes = 4 * (uint64_t)a->rows * (uint64_t)a->width;  /* rows <= 2^32, width < 2^32 */
            if (readout_section(k) && !readout) {
                CHECK(a->data == NULL && a->rows == 0 && a->width == 0 && a->bytes == 0, p, len);
                continue;
            }
            CHECK(a->data == end && a->rows == v.header.n_bins && a->bytes == bytes, p, len);
            CHECK(a->data >= p + HDR && bytes <= (uint64_t)(p + len - a->data), p, len);
            for (i = 0; i < a->rows * a->width; i++) sink += (uint32_t)svae_i32(a, i);  /* read it all */
            if (svae_view_aligned(&v) && a->bytes) {  /* the cast the client makes: UBSan checks it */
                const float *f = (const float *)(const void *)a->data;
                float last = f[a->rows * a->width - 1];
                uint32_t u;
                memcpy(&u, &last, 4);
                sink += u;
            }
            end = a->data + a->bytes;
        }
        CHECK(end == p + len, p, len);
    } else {
        for (k = 0; k < SVAE_N_SECTIONS; k++) CHECK(v.section[k].data == NULL && v.section[k].bytes == 0, p, len);
        if (v.json) {
            CHECK(v.json == (const char *)p + HDR && v.json_len == len - HDR, p, len);
            CHECK(memchr(v.json, 0, v.json_len) == NULL, p, len);
            for (i = 0; i < v.json_len; i++) sink += (unsigned char)v.json[i];
        } else {
            CHECK(v.header.msg_type == SVAE_PONG && len == HDR, p, len);
        }
    }
}

/* Copy the frame to a heap block that ends where it ends, starting 0..3 bytes past the block's
 * (malloc'd, so aligned) start, and check it. */
static void check_input(const unsigned char *frame, size_t len, const expect_t *e, size_t misalign) {
    unsigned char *block = (unsigned char *)malloc(misalign + len ? misalign + len : 1);
    if (!block) { fprintf(stderr, "out of memory\n"); exit(2); }
    if (len) memcpy(block + misalign, frame, len);
    check_parsed(block + misalign, len, e);
    free(block);
}

/* -- inputs ----------------------------------------------------------------------------------- */

static void header(unsigned char *p, uint8_t type, uint8_t status, size_t body, expect_t *e) {
    memset(p, 0, HDR);
    memcpy(p, "SVAE", 4);
    p[O_VERSION] = VERSION;
    p[O_TYPE] = type;
    p[O_STATUS] = status;
    e->type = type;
    e->status = status;
    e->seq = rnd();
    e->t_client = rnd();
    e->server_ns = (uint32_t)rnd();
    e->queue_ns = below(2) ? 0 : (uint32_t)rnd();
    e->flags = 0;
    put64(p + O_SEQ, e->seq);
    put64(p + O_TCLIENT, e->t_client);
    put32(p + O_SERVER_NS, e->server_ns);
    put32(p + O_QUEUE_NS, e->queue_ns);
    put32(p + O_BODY, body);
}

/* (a) A valid reply of a random type; returns its length. */
static size_t build_valid(unsigned char *p, expect_t *e) {
    uint64_t kind = below(10);
    size_t i, body;
    memset(e, 0, sizeof *e);
    e->valid = 1;
    if (kind < 6) {  /* DECODE_REPLY: mostly one bin, sometimes a batch, now and then 4096 thin rows */
        uint64_t shape = below(20);
        uint32_t nb = shape < 14 ? 1 : shape < 19 ? (uint32_t)(1 + below(16)) : SVAE_MAX_BINS;
        uint32_t w[SVAE_N_SECTIONS];
        size_t sum = 0;
        int readout = below(4) != 0;  /* mostly with a readout; without, its sections are absent */
        w[SVAE_SEC_CONTENT] = (uint32_t)(below(4) ? below(33) : 0);
        w[SVAE_SEC_STYLE_MEAN] = (uint32_t)(below(4) ? below(33) : 0);
        w[SVAE_SEC_ANGLE] = w[SVAE_SEC_DIRECTION] = readout ? 1 : 0;
        w[SVAE_SEC_PROBA] = readout ? (uint32_t)below(17) : 0;
        w[SVAE_SEC_VELOCITY] = readout ? (uint32_t)below(4) : 0;
        w[SVAE_SEC_RATES] = (uint32_t)(below(4) ? below(301) : 0);
        if (nb == SVAE_MAX_BINS) w[SVAE_SEC_CONTENT] = w[SVAE_SEC_STYLE_MEAN] = w[SVAE_SEC_RATES] = 1;
        for (i = 0; i < SVAE_N_SECTIONS; i++) sum += w[i];
        body = 4 * (size_t)nb * sum;
        header(p, SVAE_DECODE_REPLY, 0, body, e);
        e->readout = readout;
        e->flags = (uint8_t)((readout ? HAS_READOUT : 0) | (below(2) ? RESET_APPLIED : 0));
        p[O_FLAGS] = e->flags;
        put32(p + O_NBINS, nb);
        put16(p + O_CONTENT, w[SVAE_SEC_CONTENT]);
        put16(p + O_STYLE, w[SVAE_SEC_STYLE_MEAN]);
        put16(p + O_CLASSES, w[SVAE_SEC_PROBA]);
        put16(p + O_VELOCITY, w[SVAE_SEC_VELOCITY]);
        put16(p + O_HISTORY, readout ? 1 + below(8) : 0);
        put32(p + O_NRATES, w[SVAE_SEC_RATES]);
        e->n_bins = nb;
        memcpy(e->widths, w, sizeof w);
        for (i = 0; i < body; i += 8) put64(p + HDR + i, rnd());  /* body is a multiple of 4; cap has room */
    } else if (kind == 9) {
        header(p, SVAE_PONG, 0, 0, e);
        body = 0;
    } else {  /* INFO, STATS or ERROR: printable text, like the server's JSON */
        uint8_t type = kind == 6 ? SVAE_INFO_REPLY : kind == 7 ? SVAE_STATS_REPLY : SVAE_ERROR;
        uint8_t status = type == SVAE_ERROR ? (uint8_t)(below(4) ? 1 + below(9) : 1 + below(255)) : 0;
        body = (size_t)below(400);
        header(p, type, status, body, e);
        for (i = 0; i < body; i++) p[HDR + i] = (unsigned char)(' ' + below(95));
    }
    return HDR + body;
}

static const uint64_t extremes[] = {0, 1, 2, 3, 4, 0x7F, 0x80, 0x81, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                                    4095, 4096, 4097, 0x3FFFFFFF, 0x40000000, 0x7FFFFFFE, 0x7FFFFFFF, 0x80000000u,
                                    0x80000001u, 0xFFFFFFFCu, 0xFFFFFFFEu, 0xFFFFFFFFu, 0x100000000ull,
                                    0x7FFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull};
static const struct { unsigned char off, size; } fields[] = {
    {O_VERSION, 1}, {O_TYPE, 1}, {O_STATUS, 1}, {O_FLAGS, 1}, {O_SEQ, 8}, {O_TCLIENT, 8}, {O_SERVER_NS, 4},
    {O_QUEUE_NS, 4}, {O_NBINS, 4}, {O_CONTENT, 2}, {O_STYLE, 2}, {O_CLASSES, 2}, {O_VELOCITY, 2}, {O_HISTORY, 2},
    {O_RESERVED, 2}, {O_NRATES, 4}, {O_BODY, 4}};
#define N_FIELDS (sizeof fields / sizeof fields[0])
#define N_EXTREMES (sizeof extremes / sizeof extremes[0])

static void set_field(unsigned char *p, size_t f, uint64_t v) {
    switch (fields[f].size) {
    case 1: p[fields[f].off] = (unsigned char)v; break;
    case 2: put16(p + fields[f].off, v); break;
    case 4: put32(p + fields[f].off, v); break;
    default: put64(p + fields[f].off, v); break;
    }
}
/* the dimension fields (indices into fields[]): the ones products are made of, the flags byte that
 * decides which sections count, and history_bins (0 without a readout) */
static const size_t dim_fields[] = {3, 8, 9, 10, 11, 12, 13, 15};
#define N_DIM_FIELDS (sizeof dim_fields / sizeof dim_fields[0])

/* (b) Mutate a frame in place (room up to FRAME_CAP); returns the new length. */
static size_t mutate(unsigned char *p, size_t len) {
    uint64_t m = below(10), n, i;
    switch (m) {
    case 0:  /* bit flips anywhere */
    case 1:  /* bit flips in the header */
        for (n = 1 + below(8), i = 0; i < n; i++) {
            size_t at = (size_t)below(m == 0 ? len : (len < HDR ? len : HDR));
            p[at] ^= (unsigned char)(1u << below(8));
        }
        return len;
    case 2:  /* truncation */
        return below(4) ? (size_t)below(len) : len - (size_t)below(len < 5 ? len : 5);
    case 3:  /* extension, half the time with body_bytes to match */
        for (n = 1 + below(64), i = 0; i < n && len < FRAME_CAP; i++) p[len++] = (unsigned char)rnd();
        if (below(2) && len >= HDR) put32(p + O_BODY, len - HDR);
        return len;
    case 4:  /* one header field to an extreme */
        set_field(p, (size_t)below(N_FIELDS), extremes[below(N_EXTREMES)]);
        return len;
    case 5:  /* dimension fields to extremes, body_bytes kept consistent: the size checks decide */
    case 6:
        for (n = 1 + below(3), i = 0; i < n; i++)
            set_field(p, dim_fields[below(N_DIM_FIELDS)], extremes[below(N_EXTREMES)]);
        if (m == 6) put32(p + O_BODY, below(2) ? extremes[below(N_EXTREMES)] : rnd());
        else put32(p + O_BODY, len - HDR);
        return len;
    case 7:  /* body_bytes alone off by a little or set far */
        put32(p + O_BODY, below(2) ? get32(p + O_BODY) + (uint64_t)below(9) - 4 : rnd());
        return len;
    case 8:  /* a NUL in the body (JSON must not have one) */
        if (len > HDR) p[HDR + below(len - HDR)] = 0;
        return len;
    default:  /* a byte to a random value */
        p[below(len)] = (unsigned char)rnd();
        return len;
    }
}

/* The inverse of an odd a modulo 2^64 (Newton's iteration). */
static uint64_t inverse_odd(uint64_t a) {
    uint64_t x = a;  /* correct to 3 bits */
    int i;
    for (i = 0; i < 5; i++) x *= 2 - a * x;
    return x;
}

/* (c) A DECODE_REPLY header whose 4 * n_bins * (sum of widths) wraps to the body it carries:
 * modulo 2^64 (64-bit size_t; the issue's reply is one) or modulo 2^32 (body_bytes, 32-bit
 * size_t). Everything else in the frame is valid; with or without the readout's sections. */
static size_t build_wrap(unsigned char *p) {
    expect_t e;
    uint64_t nb, sum, cd, sd, nc, vd, nr, k, fixed;
    int readout = below(4) != 0;
    size_t body, i;
    if (below(2)) {  /* 4 * nb * sum = 2^64 or 2^65 exactly, empty body */
        uint64_t which = below(3);  /* (nb, sum): (2^31, 2^31), (2^31, 2^32), (2^30, 2^32) */
        nb = which == 2 ? (uint64_t)1 << 30 : (uint64_t)1 << 31;
        sum = which == 0 ? (uint64_t)1 << 31 : (uint64_t)1 << 32;
        body = 0;
    } else {  /* 4 * nb * sum = 4k (mod 2^32), k < 1024: nb = k / sum (mod 2^30) for an odd sum */
        sum = 3 + 2 * below(0x7FFFFFFF);                  /* odd, 3 .. 2^32 - 1 */
        k = below(1024);
        nb = (k * inverse_odd(sum)) & 0x3FFFFFFF;
        nb |= below(4) << 30;
        if (nb == 0) nb = (uint64_t)1 << 30;              /* only when k is 0 */
        body = 4 * (size_t)k;
    }
    /* split sum - fixed (fixed = 2 with the readout's angle and direction, at most 2^32 - 2) into
     * the width fields: uint16 ones and n_rates (uint32); without the readout, no classes or velocity */
    fixed = readout ? 2 : 0;
    cd = below(2) ? below(0x10000) : 0;
    sd = below(2) ? below(0x10000) : 0;
    nc = readout && below(2) ? below(0x10000) : 0;
    vd = readout && below(2) ? below(0x10000) : 0;
    if (cd + sd + nc + vd > sum - fixed) cd = sd = nc = vd = 0;
    nr = sum - fixed - cd - sd - nc - vd;
    if (nr > 0xFFFFFFFFull) { readout = 1; fixed = 2; nr -= 2; }  /* sum = 2^32 without a readout */
    if (((4 * nb * sum) & 0xFFFFFFFFull) != body || cd + sd + nc + vd + nr + fixed != sum) {
        fprintf(stderr, "build_wrap is wrong\n");
        exit(2);
    }
    header(p, SVAE_DECODE_REPLY, 0, body, &e);
    p[O_FLAGS] = (unsigned char)(readout ? HAS_READOUT : 0);
    put32(p + O_NBINS, nb);
    put16(p + O_CONTENT, cd);
    put16(p + O_STYLE, sd);
    put16(p + O_CLASSES, nc);
    put16(p + O_VELOCITY, vd);
    put16(p + O_HISTORY, readout ? 3 : 0);
    put32(p + O_NRATES, nr);
    for (i = 0; i < body; i++) p[HDR + i] = (unsigned char)rnd();
    return HDR + body;
}

/* (d) Random bytes; half of them behind a plausible header (magic, version, consistent length). */
static size_t build_random(unsigned char *p) {
    size_t len = (size_t)below(below(8) ? 128 : 4096), i;
    static const uint8_t types[] = {0x81, 0x82, 0x83, 0x84, 0xFF};
    for (i = 0; i < len; i++) p[i] = (unsigned char)rnd();
    if (below(2) && len >= HDR) {
        memcpy(p, "SVAE", 4);
        p[O_VERSION] = VERSION;
        p[O_TYPE] = types[below(5)];
        if (below(2)) p[O_STATUS] = p[O_TYPE] == 0xFF ? (unsigned char)(1 + below(255)) : 0;
        put32(p + O_BODY, len - HDR);
    }
    return len;
}

/* (e) The reply of issue 12: n_bins = 2^31, n_rates = 2^31 - 2, other widths 0, no body. The
 * old check 4 * B * (2 + n_rates) wrapped to 0 == body_bytes and direction pointed 8 GiB away.
 * In v2 layout, with HAS_READOUT (angle and direction count), so that it still wraps to 0. */
static size_t build_issue12(unsigned char *p) {
    memset(p, 0, HDR);
    memcpy(p, "SVAE", 4);
    p[O_VERSION] = VERSION;
    p[O_TYPE] = SVAE_DECODE_REPLY;
    p[O_FLAGS] = HAS_READOUT;
    put64(p + O_SEQ, 1);
    put32(p + O_NBINS, 0x80000000u);
    put32(p + O_NRATES, 0x7FFFFFFEu);
    return HDR;
}

/* The checked helpers against their portable forms and a plain reference. */
static void check_arithmetic(void) {
    static const size_t edges[] = {0, 1, 2, 3, 4, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000u, 0xFFFFFFFFu, SIZE_MAX / 4,
                                   SIZE_MAX / 4 + 1, SIZE_MAX / 2, SIZE_MAX / 2 + 1, SIZE_MAX - 1, SIZE_MAX};
    size_t n = sizeof edges / sizeof edges[0], i;
    unsigned char none = 0;
    category = "arithmetic";
    for (i = 0; i < n * n + 100000; i++) {
        size_t a = i < n * n ? edges[i / n] : (size_t)rnd() >> below(8 * sizeof(size_t));
        size_t b = i < n * n ? edges[i % n] : (size_t)rnd() >> below(8 * sizeof(size_t));
        size_t x = 0, y = 0;
        int o1 = svae_mul_size(a, b, &x), o2 = svae_mul_size_portable(a, b, &y);
        int ref = a != 0 && b > SIZE_MAX / a;
        iteration = i;
        CHECK(o1 == ref && o2 == ref && (ref || (x == a * b && y == a * b)), &none, 0);
        o1 = svae_add_size(a, b, &x), o2 = svae_add_size_portable(a, b, &y);
        ref = b > SIZE_MAX - a;
        CHECK(o1 == ref && o2 == ref && (ref || (x == a + b && y == a + b)), &none, 0);
    }
}

static void check_arguments(void) {
    unsigned char p[HDR] = {0};
    svae_reply_view v;
    category = "arguments";
    CHECK(svae_parse_reply(NULL, 100, &v) == SVAE_E_ARG, p, 0);
    CHECK(svae_parse_reply(p, sizeof p, NULL) == SVAE_E_ARG, p, 0);
}

/* -- main --------------------------------------------------------------------------------------- */

#ifdef SVAE_LIBFUZZER
/* Each input is parsed as a frame, and also seeds one generated input of the kinds above. */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    check_arithmetic();
    check_arguments();
    return 0;
}
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static unsigned char frame[FRAME_CAP];
    expect_t e;
    size_t i, len;
    category = "libfuzzer";
    check_input(data, size, NULL, 0);
    for (rng = 0x5BAE12C11E47ull, i = 0; i < size; i++) rng = (rng ^ data[i]) * 0x100000001B3ull;  /* FNV-1a */
    memset(&e, 0, sizeof e);
    switch (size ? data[0] % 5 : 0) {
    case 0: len = build_valid(frame, &e); break;
    case 1: len = mutate(frame, build_valid(frame, &e)); e.valid = 0; break;
    case 2: len = build_wrap(frame); break;
    case 3: len = build_random(frame); break;
    default: len = build_issue12(frame); set_field(frame, dim_fields[below(N_DIM_FIELDS)], extremes[below(N_EXTREMES)]); break;
    }
    check_input(frame, len, &e, (size_t)below(4));
    if (failures) abort();
    return 0;
}
#else

static int parse_file(const char *path) {
    static unsigned char buf[FRAME_CAP + 1];
    FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
    size_t len, k;
    svae_reply_view v;
    int rc;
    if (!f) { perror(path); return 2; }
    len = fread(buf, 1, sizeof buf, f);
    if (f != stdin) fclose(f);
    if (len > FRAME_CAP) { fprintf(stderr, "%s: over %zu bytes\n", path, (size_t)FRAME_CAP); return 2; }
    {
        unsigned char *block = (unsigned char *)malloc(len + 1);
        if (!block) return 2;
        memcpy(block, buf, len);
        rc = svae_parse_reply(block, len, &v);
        printf("rc=%d %s %s\n", rc, code_name(rc) ? code_name(rc) : "?", svae_strerror(rc));
        if (rc == SVAE_OK) {
            const svae_reply_header *h = &v.header;
            printf("msg_type=%u status=%u flags=%u seq=%llu t_client_ns=%llu server_ns=%lu queue_ns=%lu n_bins=%lu "
                   "content_dim=%u style_dim=%u n_classes=%u velocity_dim=%u history_bins=%u n_rates=%lu "
                   "body_bytes=%lu\n",
                   h->msg_type, h->status, h->flags, (unsigned long long)h->seq, (unsigned long long)h->t_client_ns,
                   (unsigned long)h->server_ns, (unsigned long)h->queue_ns, (unsigned long)h->n_bins, h->content_dim,
                   h->style_dim, h->n_classes, h->velocity_dim, h->history_bins, (unsigned long)h->n_rates,
                   (unsigned long)h->body_bytes);
            if (h->msg_type == SVAE_DECODE_REPLY)
                for (k = 0; k < SVAE_N_SECTIONS; k++) {
                    const svae_array *a = &v.section[k];
                    if (!a->data) {
                        printf("section %zu absent=1\n", k);
                        continue;
                    }
                    printf("section %zu offset=%zu rows=%zu width=%zu first=%.9g\n", k, (size_t)(a->data - block),
                           a->rows, a->width, a->bytes ? (k == SVAE_SEC_DIRECTION ? (double)svae_i32(a, 0)
                                                                                  : (double)svae_f32(a, 0)) : 0.0);
                }
            if (v.json) printf("json %.*s\n", (int)v.json_len, v.json);
        }
        free(block);
    }
    return 0;
}

int main(int argc, char **argv) {
    static unsigned char frame[FRAME_CAP];
    unsigned long count = 100000, i, n_cat[5] = {0}, accepted;
    uint64_t seed = 0x5BAE12C11E47ull;
    expect_t e;
    clock_t t0;
    size_t len;
    int k;
    if (argc > 2 && strcmp(argv[1], "--parse") == 0) return parse_file(argv[2]);
    if (argc > 1) count = strtoul(argv[1], NULL, 0);
    if (argc > 2) seed = strtoull(argv[2], NULL, 0);
    rng = seed;
    t0 = clock();
    check_arithmetic();
    check_arguments();

    /* (e) first, with its expected code: DIMS under the default limits, OVERFLOW without them */
    category = "issue12";
    iteration = 0;
    len = build_issue12(frame);
    {
        svae_reply_view v;
        int rc = svae_parse_reply(frame, len, &v);
        int want = (uint64_t)SVAE_REPLY_MAX_BINS < 0x80000000u ? SVAE_E_DIMS : SVAE_E_OVERFLOW;
        printf("issue 12 reply (n_bins=2^31, n_rates=2^31-2): rc=%d %s, expected %s\n", rc, code_name(rc),
               code_name(want));
        if (rc != want) { fprintf(stderr, "FAIL: the issue 12 reply gave %d\n", rc); failures++; }
    }
    check_input(frame, len, NULL, 0);

    for (i = 1; i <= count; i++) {
        uint64_t c = below(100);
        iteration = i;
        memset(&e, 0, sizeof e);
        if (c < 20) {          /* (a) valid */
            category = "valid";
            n_cat[0]++;
            len = build_valid(frame, &e);
        } else if (c < 70) {   /* (b) mutated valid, 1 to 3 mutations */
            uint64_t m, n = 1 + below(3);
            category = "mutated";
            n_cat[1]++;
            len = build_valid(frame, &e);
            e.valid = 0;
            for (m = 0; m < n && len; m++) len = mutate(frame, len);
        } else if (c < 80) {   /* (c) wrapping sizes */
            category = "wrap";
            n_cat[2]++;
            len = build_wrap(frame);
        } else if (c < 95) {   /* (d) random */
            category = "random";
            n_cat[3]++;
            len = build_random(frame);
        } else {               /* (e) the issue's reply with one field changed */
            category = "issue12-variant";
            n_cat[4]++;
            len = build_issue12(frame);
            if (below(2)) set_field(frame, dim_fields[below(N_DIM_FIELDS)], extremes[below(N_EXTREMES)]);
        }
        check_input(frame, len, &e, (size_t)below(4));
    }
    accepted = by_code[0];
    printf("fuzz_reply: %lu inputs (valid %lu, mutated %lu, wrap %lu, random %lu, issue12 variants %lu; "
           "+1 issue 12 reply) seed %#llx, %.2f s cpu\n", count, n_cat[0], n_cat[1], n_cat[2], n_cat[3], n_cat[4],
           (unsigned long long)seed, (double)(clock() - t0) / CLOCKS_PER_SEC);
    printf("accepted %lu, rejected:", accepted);
    for (k = 1; k < N_CODES; k++)
        if (by_code[k]) printf(" %s %lu", code_name(-k), by_code[k]);
    printf("\nchecked arithmetic: %s; limits: n_bins <= %lu, widths <= %lu; sizeof(size_t) = %u\n",
#ifdef SVAE_BUILTIN_OVERFLOW
           "compiler builtins",
#else
           "portable",
#endif
           (unsigned long)SVAE_REPLY_MAX_BINS, (unsigned long)SVAE_REPLY_MAX_WIDTH, (unsigned)sizeof(size_t));
    printf("%s: %lu failures\n", failures ? "FAILED" : "OK", failures);
    return failures ? 1 : 0;
}
#endif
