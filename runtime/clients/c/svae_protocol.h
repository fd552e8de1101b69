/* svae_protocol.h: the swapvae wire protocol v2 (schemas/PROTOCOL.md) for C, and a reply parser
 * that survives any bytes.
 *
 * Pure C99: no I/O, no allocation, no libzmq. svae_client.h adds the ZeroMQ client on top;
 * fuzz_reply.c fuzzes the parser alone.
 *
 *     svae_reply_view v;
 *     int rc = svae_parse_reply(frame, frame_len, &v);      // SVAE_OK or a SVAE_E_* code < 0
 *     if (rc == SVAE_OK && v.header.msg_type == SVAE_DECODE_REPLY && (v.header.flags & SVAE_REPLY_HAS_READOUT))
 *         angle = svae_f32(&v.section[SVAE_SEC_ANGLE], 0);   // any alignment
 *     else if (rc != SVAE_OK) puts(svae_strerror(rc));
 *
 * What svae_parse_reply guarantees, for any `frame` of `len` readable bytes:
 *   - it reads only frame[0 .. len), and only after checking the index against len;
 *   - every size and offset is computed with overflow-checked size_t arithmetic, so a header
 *     whose products wrap (n_bins = 2^31, n_rates = 2^31 - 2, ...) is rejected, on 32- and
 *     64-bit hosts alike;
 *   - on SVAE_OK every pointer in the view lies inside the frame: section k covers
 *     [data, data + bytes) with bytes = 4 * rows * width, the sections present tile the body
 *     exactly, and the JSON body lies in [frame + 56, frame + len) and holds no NUL byte;
 *   - the readout's sections (angle, direction, proba, velocity) are present exactly when the
 *     reply flag SVAE_REPLY_HAS_READOUT is set; an absent section is all zero (data NULL);
 *   - on an error the view is zeroed except for what was read before the error (do not use it).
 * It validates the protocol, not the numbers: floats may be NaN, `direction` is whatever int32
 * the server sent (check it before using it as an index), JSON is not parsed.
 *
 * Alignment: the parser assumes none. A section starts at frame + 56 + 4k, so it is 4-byte
 * aligned exactly when the frame is; libzmq does not promise that for zmq_msg_data. Read
 * elements with svae_f32()/svae_i32() (a 4-byte memcpy; compilers emit a single load), or cast
 * section pointers to float/int32_t only when svae_view_aligned() says so. svae_client.h
 * receives into a malloc'd buffer, so its typed pointers (reply.angle, ...) are always aligned.
 *
 * Byte order: fields and elements are read as little-endian byte by byte, so the parser is
 * correct on any host; svae_f32/svae_i32 convert too. (The request structs below, sent as
 * raw bytes by svae_client.h, need a little-endian host.)
 */
#ifndef SVAE_PROTOCOL_H
#define SVAE_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SVAE_PROTOCOL_VERSION 2
#define SVAE_REQUEST_HEADER_BYTES 32
#define SVAE_REPLY_HEADER_BYTES 56  /* version 2 */
#define SVAE_MAX_BINS 4096          /* rows per decode request (PROTOCOL.md section 3) */

/* Limits the parser enforces on top of the spec (define before including to change them):
 * a DECODE_REPLY must have 1..SVAE_REPLY_MAX_BINS rows and every row width (content_dim,
 * style_dim, n_classes, velocity_dim, n_rates) at most SVAE_REPLY_MAX_WIDTH. They only narrow what is
 * accepted; memory safety comes from the checked arithmetic, not from them (the fuzz test also
 * runs with both set to 0xFFFFFFFF). */
#ifndef SVAE_REPLY_MAX_BINS
#define SVAE_REPLY_MAX_BINS SVAE_MAX_BINS
#endif
#ifndef SVAE_REPLY_MAX_WIDTH
#define SVAE_REPLY_MAX_WIDTH (1u << 20)
#endif

enum { SVAE_DECODE = 1, SVAE_INFO = 2, SVAE_STATS = 3, SVAE_PING = 4,
       SVAE_DECODE_REPLY = 0x81, SVAE_INFO_REPLY = 0x82, SVAE_STATS_REPLY = 0x83, SVAE_PONG = 0x84,
       SVAE_ERROR = 0xFF };
#define SVAE_REPLY_BIT 0x80
/* Request flags (svae_request_header.flags) and reply flags (svae_reply_header.flags, DECODE_REPLY). */
#define SVAE_FLAG_RESET 0x01           /* request: the first bin starts a trial (the stream's history is dropped) */
#define SVAE_REPLY_HAS_READOUT 0x01    /* reply: angle, direction, proba and velocity are present */
#define SVAE_REPLY_RESET_APPLIED 0x02  /* reply: the first bin's window started afresh (RESET, new or evicted stream) */
enum { SVAE_FLOAT32 = 1, SVAE_FLOAT64 = 2, SVAE_UINT8 = 3, SVAE_INT16 = 4, SVAE_UINT16 = 5, SVAE_INT32 = 6 };
/* Status codes of ERROR replies (PROTOCOL.md section 6); svae_status_name() names them. */
enum { SVAE_OK = 0, SVAE_BAD_HEADER = 1, SVAE_BAD_VERSION = 2, SVAE_UNKNOWN_TYPE = 3, SVAE_BAD_DTYPE = 4,
       SVAE_BAD_SHAPE = 5, SVAE_BAD_LENGTH = 6, SVAE_BAD_VALUE = 7, SVAE_INTERNAL = 8, SVAE_BAD_ENVELOPE = 9,
       SVAE_RATE_LIMITED = 10, SVAE_OVERLOADED = 11 };

/* Return codes: SVAE_OK (0) or one of these; svae_strerror() describes each. */
/* ... of the client calls in svae_client.h */
#define SVAE_E_TIMEOUT (-1)   /* no reply in time: close the socket and connect a new one */
#define SVAE_E_ZMQ (-2)       /* a libzmq error: see zmq_errno() */
#define SVAE_E_REPLY (-3)     /* a reply that breaks the protocol: svae_reply.reply_error says how */
#define SVAE_E_SERVICE (-4)   /* an ERROR reply: see svae_reply.header.status and .json */
#define SVAE_E_NOMEM (-5)     /* out of memory */
#define SVAE_E_ARG (-6)       /* a bad argument (NULL pointer, a request size that overflows) */
/* ... of svae_parse_reply and svae_reply_answers (the reply_error of SVAE_E_REPLY) */
#define SVAE_E_SHORT (-10)    /* frame shorter than the reply header */
#define SVAE_E_MAGIC (-11)    /* magic is not "SVAE" */
#define SVAE_E_VERSION (-12)  /* a protocol version this parser does not know */
#define SVAE_E_LENGTH (-13)   /* body_bytes != frame length - header size */
#define SVAE_E_TYPE (-14)     /* msg_type is not a reply type */
#define SVAE_E_STATUS (-15)   /* status is 0 on an ERROR reply, or nonzero on another */
#define SVAE_E_DIMS (-16)     /* dimension fields out of range, readout widths without HAS_READOUT,
                                 or nonzero on a non-decode reply */
#define SVAE_E_OVERFLOW (-17) /* the body size the dimensions imply overflows size_t */
#define SVAE_E_SIZE (-18)     /* body_bytes != the body size the dimensions imply */
#define SVAE_E_BODY (-19)     /* a body where none belongs (PONG), or a NUL byte in a JSON body */
#define SVAE_E_MISMATCH (-20) /* a valid reply that does not answer the request (type or n_bins) */
#define SVAE_E_TOO_BIG (-21)  /* a reply frame over the client's size limit */
#define SVAE_E_MULTIPART (-22) /* a reply of more than one frame */

typedef struct {            /* 32 bytes, PROTOCOL.md section 3 (the wire layout on a little-endian host) */
    char     magic[4];
    uint8_t  version, msg_type, dtype, flags;
    uint64_t seq;
    uint64_t t_client_ns;
    uint32_t n_channels;
    uint32_t n_bins;
} svae_request_header;

typedef struct {            /* PROTOCOL.md section 4, in host byte order (filled field by field) */
    char     magic[4];
    uint8_t  version, msg_type, status, flags;
    uint64_t seq;
    uint64_t t_client_ns;
    uint32_t server_ns;     /* request read by the server -> reply ready */
    uint32_t queue_ns;      /* the part of server_ns it waited for its turn */
    uint32_t n_bins;
    uint16_t content_dim, style_dim, n_classes, velocity_dim, history_bins, reserved;
    uint32_t n_rates;
    uint32_t body_bytes;
} svae_reply_header;

typedef char svae_check_request_size[sizeof(svae_request_header) == SVAE_REQUEST_HEADER_BYTES ? 1 : -1];

/* The sections of a DECODE_REPLY body, in wire order (PROTOCOL.md section 5). */
enum { SVAE_SEC_CONTENT, SVAE_SEC_STYLE_MEAN, SVAE_SEC_ANGLE, SVAE_SEC_DIRECTION, SVAE_SEC_PROBA,
       SVAE_SEC_VELOCITY, SVAE_SEC_RATES, SVAE_N_SECTIONS };
enum { SVAE_ELEM_F32 = 1, SVAE_ELEM_I32 = 2 };

/* One section: rows x width elements of 4 bytes, row-major, starting at `data` (inside the frame,
 * alignment unknown). bytes = 4 * rows * width; data is non-NULL even when bytes is 0, for a
 * section present. An absent section (the readout's, without SVAE_REPLY_HAS_READOUT) is all
 * zero: data NULL, rows, width and bytes 0. */
typedef struct {
    const unsigned char *data;
    size_t rows, width, bytes;
    int elem;               /* SVAE_ELEM_F32 or SVAE_ELEM_I32 */
} svae_array;

/* A validated reply: the header, and pointers into the caller's frame (valid while it is). */
typedef struct {
    svae_reply_header header;
    const unsigned char *frame;          /* the frame parsed */
    const unsigned char *body;           /* frame + header size; body_len == header.body_bytes */
    size_t len, body_len;
    svae_array section[SVAE_N_SECTIONS]; /* DECODE_REPLY (absent ones zero); all zero otherwise */
    const char *json;                    /* INFO_REPLY, STATS_REPLY, ERROR: the body (not     */
    size_t json_len;                     /* NUL-terminated, no NUL inside); NULL otherwise    */
} svae_reply_view;

/* -- checked size arithmetic ---------------------------------------------------------------- */

/* *out = a * b (a + b); returns 1 on overflow (then *out is unspecified), else 0. The portable
 * versions are always defined (the fuzz test compares them with the builtins). */
static inline int svae_mul_size_portable(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
}
static inline int svae_add_size_portable(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 1;
    *out = a + b;
    return 0;
}
#if !defined(SVAE_NO_BUILTIN_OVERFLOW)
#  if defined(__clang__) && defined(__has_builtin)
#    if __has_builtin(__builtin_mul_overflow) && __has_builtin(__builtin_add_overflow)
#      define SVAE_BUILTIN_OVERFLOW 1
#    endif
#  elif defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 5
#    define SVAE_BUILTIN_OVERFLOW 1
#  endif
#endif
static inline int svae_mul_size(size_t a, size_t b, size_t *out) {
#ifdef SVAE_BUILTIN_OVERFLOW
    return __builtin_mul_overflow(a, b, out);
#else
    return svae_mul_size_portable(a, b, out);
#endif
}
static inline int svae_add_size(size_t a, size_t b, size_t *out) {
#ifdef SVAE_BUILTIN_OVERFLOW
    return __builtin_add_overflow(a, b, out);
#else
    return svae_add_size_portable(a, b, out);
#endif
}

/* -- little-endian loads (any alignment, any host) ------------------------------------------ */

static inline uint16_t svae_le16(const unsigned char *p) { return (uint16_t)(p[0] | (unsigned)p[1] << 8); }
static inline uint32_t svae_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t svae_le64(const unsigned char *p) { return svae_le32(p) | (uint64_t)svae_le32(p + 4) << 32; }

/* Element i (row-major: row * width + col) of a section; the caller keeps i < rows * width. */
static inline float svae_f32(const svae_array *a, size_t i) {
    uint32_t u = svae_le32(a->data + 4 * i);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline int32_t svae_i32(const svae_array *a, size_t i) {
    uint32_t u = svae_le32(a->data + 4 * i);
    int32_t v;
    memcpy(&v, &u, sizeof v);
    return v;
}

/* -- the layout tables ---------------------------------------------------------------------- */
/* Everything the parser knows about a protocol version is in svae_layout(): the header size,
 * where each header field sits, and the decode sections with their row-width fields and
 * whether they belong to the readout (present only with SVAE_REPLY_HAS_READOUT). A new version
 * is a new table. This parser speaks version 2 only: a version 1 server's reply (to a v2
 * request it answers BAD_VERSION) is refused with SVAE_E_VERSION. */

enum { SVAE_W_ONE, SVAE_W_CONTENT_DIM, SVAE_W_STYLE_DIM, SVAE_W_N_CLASSES, SVAE_W_VELOCITY_DIM, SVAE_W_N_RATES };

typedef struct { unsigned char wire_offset, size; unsigned short host_offset; } svae_field_def;
typedef struct { const char *name; unsigned char elem, width, readout; } svae_section_def;
typedef struct {
    size_t header_bytes;
    const svae_field_def *fields;        /* every field after magic */
    size_t n_fields;
    const svae_section_def *sections;    /* DECODE_REPLY body, in wire order */
    size_t n_sections;
} svae_layout_def;

#define SVAE_FIELD(off, name) { off, sizeof(((svae_reply_header *)0)->name), offsetof(svae_reply_header, name) }

/* The layout of replies of `version`, or NULL for a version this parser does not know. */
static inline const svae_layout_def *svae_layout(unsigned version) {
    static const svae_field_def fields_v2[] = {
        SVAE_FIELD(4, version), SVAE_FIELD(5, msg_type), SVAE_FIELD(6, status), SVAE_FIELD(7, flags),
        SVAE_FIELD(8, seq), SVAE_FIELD(16, t_client_ns), SVAE_FIELD(24, server_ns), SVAE_FIELD(28, queue_ns),
        SVAE_FIELD(32, n_bins), SVAE_FIELD(36, content_dim), SVAE_FIELD(38, style_dim), SVAE_FIELD(40, n_classes),
        SVAE_FIELD(42, velocity_dim), SVAE_FIELD(44, history_bins), SVAE_FIELD(46, reserved),
        SVAE_FIELD(48, n_rates), SVAE_FIELD(52, body_bytes)};
    static const svae_section_def sections_v2[SVAE_N_SECTIONS] = {
        {"content", SVAE_ELEM_F32, SVAE_W_CONTENT_DIM, 0}, {"style_mean", SVAE_ELEM_F32, SVAE_W_STYLE_DIM, 0},
        {"angle", SVAE_ELEM_F32, SVAE_W_ONE, 1}, {"direction", SVAE_ELEM_I32, SVAE_W_ONE, 1},
        {"proba", SVAE_ELEM_F32, SVAE_W_N_CLASSES, 1}, {"velocity", SVAE_ELEM_F32, SVAE_W_VELOCITY_DIM, 1},
        {"rates", SVAE_ELEM_F32, SVAE_W_N_RATES, 0}};
    static const svae_layout_def v2 = {SVAE_REPLY_HEADER_BYTES, fields_v2, sizeof fields_v2 / sizeof fields_v2[0],
                                       sections_v2, SVAE_N_SECTIONS};
    return version == 2 ? &v2 : NULL;
}

/* The row width a section takes from the header. */
static inline uint32_t svae_width(const svae_reply_header *h, unsigned char w) {
    switch (w) {
    case SVAE_W_CONTENT_DIM: return h->content_dim;
    case SVAE_W_STYLE_DIM: return h->style_dim;
    case SVAE_W_N_CLASSES: return h->n_classes;
    case SVAE_W_VELOCITY_DIM: return h->velocity_dim;
    case SVAE_W_N_RATES: return h->n_rates;
    default: return 1;
    }
}

enum { SVAE_BODY_NONE, SVAE_BODY_JSON, SVAE_BODY_DECODE };

/* What body a reply type carries, or -1 for a type that is not a reply. */
static inline int svae_reply_body(uint8_t msg_type) {
    switch (msg_type) {
    case SVAE_DECODE_REPLY: return SVAE_BODY_DECODE;
    case SVAE_INFO_REPLY: case SVAE_STATS_REPLY: case SVAE_ERROR: return SVAE_BODY_JSON;
    case SVAE_PONG: return SVAE_BODY_NONE;
    default: return -1;
    }
}

/* -- the parser ----------------------------------------------------------------------------- */

/* Validate the reply frame[0 .. len) and describe it in *v (pointers into frame). Returns
 * SVAE_OK, SVAE_E_ARG for a NULL frame or view, or the first SVAE_E_* check that fails, in
 * this order: SHORT, MAGIC, VERSION, SHORT (header of that version), LENGTH, TYPE, STATUS,
 * then by type: DIMS, OVERFLOW, SIZE (decode) or DIMS, BODY (others). */
static inline int svae_parse_reply(const void *frame, size_t len, svae_reply_view *v) {
    const unsigned char *p = (const unsigned char *)frame;
    const svae_layout_def *lay;
    svae_reply_header *h;
    size_t i, body_len;
    int body;
    if (!v) return SVAE_E_ARG;
    memset(v, 0, sizeof *v);
    if (!p) return SVAE_E_ARG;
    if (len < 5) return SVAE_E_SHORT;                      /* magic and version */
    if (memcmp(p, "SVAE", 4) != 0) return SVAE_E_MAGIC;
    lay = svae_layout(p[4]);
    if (!lay) return SVAE_E_VERSION;
    if (len < lay->header_bytes) return SVAE_E_SHORT;
    h = &v->header;
    memcpy(h->magic, p, 4);
    for (i = 0; i < lay->n_fields; i++) {                  /* wire_offset + size <= header_bytes */
        const svae_field_def *f = &lay->fields[i];
        const unsigned char *q = p + f->wire_offset;
        unsigned char *dst = (unsigned char *)h + f->host_offset;
        uint8_t u8; uint16_t u16; uint32_t u32; uint64_t u64;
        switch (f->size) {
        case 1: u8 = q[0]; memcpy(dst, &u8, 1); break;
        case 2: u16 = svae_le16(q); memcpy(dst, &u16, 2); break;
        case 4: u32 = svae_le32(q); memcpy(dst, &u32, 4); break;
        default: u64 = svae_le64(q); memcpy(dst, &u64, 8); break;
        }
    }
    body_len = len - lay->header_bytes;
    if ((uint64_t)h->body_bytes != (uint64_t)body_len) return SVAE_E_LENGTH;  /* also when len > 4 GiB */
    body = svae_reply_body(h->msg_type);
    if (body < 0) return SVAE_E_TYPE;
    if ((h->msg_type == SVAE_ERROR) != (h->status != 0)) return SVAE_E_STATUS;
    v->frame = p;
    v->len = len;
    v->body = p + lay->header_bytes;
    v->body_len = body_len;

    if (body == SVAE_BODY_DECODE) {
        size_t rows = h->n_bins, sum = 0, total, off = 0;
        int readout = (h->flags & SVAE_REPLY_HAS_READOUT) != 0;
        if (rows < 1 || rows > SVAE_REPLY_MAX_BINS) return SVAE_E_DIMS;
        if (!readout && (h->n_classes || h->velocity_dim || h->history_bins)) return SVAE_E_DIMS;
        for (i = 0; i < lay->n_sections; i++) {
            uint32_t w = svae_width(h, lay->sections[i].width);
            if (lay->sections[i].readout && !readout) continue;
            if (w > SVAE_REPLY_MAX_WIDTH) return SVAE_E_DIMS;
            if (svae_add_size(sum, w, &sum)) return SVAE_E_OVERFLOW;
        }
        if (svae_mul_size(rows, sum, &total) || svae_mul_size(total, 4, &total)) return SVAE_E_OVERFLOW;
        if (total != body_len) return SVAE_E_SIZE;
        for (i = 0; i < lay->n_sections; i++) {            /* each end checked against body_len */
            svae_array *a = &v->section[i];
            size_t end;
            if (lay->sections[i].readout && !readout) continue;  /* absent: left all zero */
            a->rows = rows;
            a->width = svae_width(h, lay->sections[i].width);
            a->elem = lay->sections[i].elem;
            if (svae_mul_size(rows, a->width, &a->bytes) || svae_mul_size(a->bytes, 4, &a->bytes) ||
                svae_add_size(off, a->bytes, &end))
                return SVAE_E_OVERFLOW;
            if (end > body_len) return SVAE_E_SIZE;
            a->data = v->body + off;
            off = end;
        }
        if (off != body_len) return SVAE_E_SIZE;
        return SVAE_OK;
    }
    if (h->n_bins || h->content_dim || h->style_dim || h->n_classes || h->velocity_dim || h->history_bins ||
        h->n_rates)
        return SVAE_E_DIMS;
    if (body == SVAE_BODY_NONE) return body_len ? SVAE_E_BODY : SVAE_OK;
    if (body_len && memchr(v->body, 0, body_len)) return SVAE_E_BODY;
    v->json = (const char *)v->body;
    v->json_len = body_len;
    return SVAE_OK;
}

/* Whether a parsed reply answers a request of `msg_type` (and, for DECODE, of `n_bins` rows):
 * SVAE_OK for the matching reply type or an ERROR, else SVAE_E_MISMATCH. A client that reads
 * DECODE_REPLY sections after a PONG of the right seq would read NULL pointers; this stops it. */
static inline int svae_reply_answers(const svae_reply_view *v, uint8_t msg_type, uint32_t n_bins) {
    if (v->header.msg_type == SVAE_ERROR) return SVAE_OK;
    if (v->header.msg_type != (msg_type | SVAE_REPLY_BIT)) return SVAE_E_MISMATCH;
    if (msg_type == SVAE_DECODE && v->header.n_bins != n_bins) return SVAE_E_MISMATCH;
    return SVAE_OK;
}

/* Whether every section of the view starts 4-byte aligned (true iff the frame does). */
static inline int svae_view_aligned(const svae_reply_view *v) {
    return ((uintptr_t)v->frame & 3u) == 0;
}

/* -- names ----------------------------------------------------------------------------------- */

/* A description of any return code above (SVAE_OK, SVAE_E_*); never NULL. */
static inline const char *svae_strerror(int code) {
    switch (code) {
    case SVAE_OK: return "ok";
    case SVAE_E_TIMEOUT: return "no reply in time (reconnect)";
    case SVAE_E_ZMQ: return "libzmq error (see zmq_errno)";
    case SVAE_E_REPLY: return "the reply breaks the protocol (see reply_error)";
    case SVAE_E_SERVICE: return "the service answered with an ERROR reply (see status and json)";
    case SVAE_E_NOMEM: return "out of memory";
    case SVAE_E_ARG: return "bad argument";
    case SVAE_E_SHORT: return "reply shorter than its header";
    case SVAE_E_MAGIC: return "reply magic is not SVAE";
    case SVAE_E_VERSION: return "reply of an unknown protocol version";
    case SVAE_E_LENGTH: return "reply body_bytes disagrees with the frame length";
    case SVAE_E_TYPE: return "reply msg_type is not a reply type";
    case SVAE_E_STATUS: return "reply status disagrees with its msg_type";
    case SVAE_E_DIMS: return "reply dimensions out of range";
    case SVAE_E_OVERFLOW: return "reply dimensions overflow the body size";
    case SVAE_E_SIZE: return "reply body size disagrees with its dimensions";
    case SVAE_E_BODY: return "reply body invalid for its type";
    case SVAE_E_MISMATCH: return "reply does not answer the request";
    case SVAE_E_TOO_BIG: return "reply frame over the size limit";
    case SVAE_E_MULTIPART: return "reply of more than one frame";
    default: return "unknown error code";
    }
}

/* The name of an ERROR reply's status (PROTOCOL.md section 6); never NULL. */
static inline const char *svae_status_name(int status) {
    static const char *const names[] = {"OK", "BAD_HEADER", "BAD_VERSION", "UNKNOWN_TYPE", "BAD_DTYPE",
                                        "BAD_SHAPE", "BAD_LENGTH", "BAD_VALUE", "INTERNAL", "BAD_ENVELOPE",
                                        "RATE_LIMITED", "OVERLOADED"};
    return status >= 0 && status < (int)(sizeof names / sizeof names[0]) ? names[status] : "UNKNOWN_STATUS";
}

#endif
