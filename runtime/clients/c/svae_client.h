/* svae_client.h: a minimal C client for the swapvae decoding service, wire protocol v1.
 *
 * Written from schemas/PROTOCOL.md alone (that is its purpose: it proves the spec is enough).
 * Header-only; needs libzmq (Debian: libzmq3-dev) and a little-endian host.
 *
 *     void *ctx = zmq_ctx_new();
 *     void *sock = svae_connect(ctx, "tcp://127.0.0.1:5555", 100);    // DEALER, 100 ms timeouts
 *     svae_reply r;
 *     if (svae_decode_f32(sock, seq, counts, n_channels, &r) == 0)    // one bin of float32 counts
 *         use(r.angle[0], r.direction[0]);
 */
#ifndef SVAE_CLIENT_H
#define SVAE_CLIENT_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#define SVAE_PROTOCOL_VERSION 1

enum { SVAE_DECODE = 1, SVAE_INFO = 2, SVAE_STATS = 3, SVAE_PING = 4,
       SVAE_DECODE_REPLY = 0x81, SVAE_INFO_REPLY = 0x82, SVAE_STATS_REPLY = 0x83, SVAE_PONG = 0x84,
       SVAE_ERROR = 0xFF };
enum { SVAE_FLOAT32 = 1, SVAE_FLOAT64 = 2, SVAE_UINT8 = 3, SVAE_INT16 = 4, SVAE_UINT16 = 5, SVAE_INT32 = 6 };
enum { SVAE_OK = 0, SVAE_BAD_HEADER = 1, SVAE_BAD_VERSION = 2, SVAE_UNKNOWN_TYPE = 3, SVAE_BAD_DTYPE = 4,
       SVAE_BAD_SHAPE = 5, SVAE_BAD_LENGTH = 6, SVAE_BAD_VALUE = 7, SVAE_INTERNAL = 8, SVAE_BAD_ENVELOPE = 9 };

/* Return codes of the functions below (besides SVAE_OK). */
#define SVAE_E_TIMEOUT (-1)   /* no reply in time: close the socket and connect a new one */
#define SVAE_E_ZMQ (-2)       /* a libzmq error: see zmq_errno() */
#define SVAE_E_REPLY (-3)     /* a reply that breaks the protocol */
#define SVAE_E_SERVICE (-4)   /* an ERROR reply: see svae_reply.header.status and .error_json */

typedef struct {            /* 32 bytes, PROTOCOL.md section 3 */
    char     magic[4];
    uint8_t  version, msg_type, dtype, flags;
    uint64_t seq;
    uint64_t t_client_ns;
    uint32_t n_channels;
    uint32_t n_bins;
} svae_request_header;

typedef struct {            /* 48 bytes, PROTOCOL.md section 4 */
    char     magic[4];
    uint8_t  version, msg_type, status, flags;
    uint64_t seq;
    uint64_t t_client_ns;
    uint32_t server_ns;
    uint32_t n_bins;
    uint16_t content_dim, style_dim, n_classes, reserved;
    uint32_t n_rates;
    uint32_t body_bytes;
} svae_reply_header;

typedef char svae_check_request_size[sizeof(svae_request_header) == 32 ? 1 : -1];
typedef char svae_check_reply_size[sizeof(svae_reply_header) == 48 ? 1 : -1];

/* A received reply. The pointers point into `frame` (4-byte aligned), valid until the next
 * call with this svae_reply; call svae_reply_free when done with it. */
typedef struct {
    svae_reply_header header;
    const float *content, *style_mean, *angle, *proba, *rates; /* decode replies: n_bins rows each */
    const int32_t *direction;
    const char *json;       /* INFO/STATS/ERROR body (NUL-terminated copy), else NULL */
    uint64_t rtt_ns;        /* measured here, send to receipt */
    uint32_t *frame;        /* owned buffer */
    size_t frame_cap;
} svae_reply;

static inline int svae_little_endian(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

static inline uint64_t svae_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A DEALER socket connected to `endpoint` with send/receive timeouts and no linger, or NULL. */
static inline void *svae_connect(void *ctx, const char *endpoint, int timeout_ms) {
    if (!svae_little_endian()) return NULL; /* the header structs below assume it */
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    if (!s) return NULL;
    if (zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero) || zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms) ||
        zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout_ms, sizeof timeout_ms) || zmq_connect(s, endpoint)) {
        zmq_close(s);
        return NULL;
    }
    return s;
}

static inline void svae_request_init(svae_request_header *h, uint8_t msg_type, uint64_t seq) {
    memset(h, 0, sizeof *h);
    memcpy(h->magic, "SVAE", 4);
    h->version = SVAE_PROTOCOL_VERSION;
    h->msg_type = msg_type;
    h->seq = seq;
    h->t_client_ns = svae_now_ns();
}

static inline void svae_reply_free(svae_reply *r) {
    free(r->frame);
    free((void *)r->json);
    memset(r, 0, sizeof *r);
}

/* Send one request frame (header + body) and receive the reply with the same seq into `r`.
 * Replies with another seq (late answers to earlier requests) are skipped. */
static inline int svae_exchange(void *sock, const svae_request_header *h, const void *body, size_t body_len,
                                svae_reply *r) {
    size_t len = sizeof *h + body_len;
    uint8_t stack[4096];
    uint8_t *req = len <= sizeof stack ? stack : (uint8_t *)malloc(len);
    uint64_t t0 = svae_now_ns();
    int rc, n;
    if (!req) return SVAE_E_ZMQ;
    memcpy(req, h, sizeof *h);
    if (body_len) memcpy(req + sizeof *h, body, body_len);
    rc = zmq_send(sock, req, len, 0);
    if (req != stack) free(req);
    if (rc < 0) return zmq_errno() == EAGAIN ? SVAE_E_TIMEOUT : SVAE_E_ZMQ;
    if (!r->frame) {
        r->frame_cap = 1u << 16;
        r->frame = (uint32_t *)malloc(r->frame_cap);
        if (!r->frame) return SVAE_E_ZMQ;
    }
    for (;;) {
        n = zmq_recv(sock, r->frame, r->frame_cap, 0);
        if (n < 0) return zmq_errno() == EAGAIN ? SVAE_E_TIMEOUT : SVAE_E_ZMQ;
        if ((size_t)n > r->frame_cap) return SVAE_E_REPLY; /* over 64 KiB: a batch too big for this client */
        if ((size_t)n < sizeof r->header) return SVAE_E_REPLY;
        memcpy(&r->header, r->frame, sizeof r->header);
        if (memcmp(r->header.magic, "SVAE", 4) || r->header.body_bytes != (uint32_t)n - sizeof r->header)
            return SVAE_E_REPLY;
        if (r->header.seq == h->seq) break;
    }
    r->rtt_ns = svae_now_ns() - t0;
    free((void *)r->json);
    r->json = NULL;
    r->content = r->style_mean = r->angle = r->proba = r->rates = NULL;
    r->direction = NULL;
    const uint8_t *b = (const uint8_t *)r->frame + sizeof r->header;
    if (r->header.msg_type == SVAE_DECODE_REPLY) {
        const svae_reply_header *x = &r->header;
        size_t B = x->n_bins, off = 0;
        size_t need = 4 * B * ((size_t)x->content_dim + x->style_dim + 2 + x->n_classes + x->n_rates);
        if (need != x->body_bytes) return SVAE_E_REPLY;
        r->content = (const float *)(b + off);     off += 4 * B * x->content_dim;
        r->style_mean = (const float *)(b + off);  off += 4 * B * x->style_dim;
        r->angle = (const float *)(b + off);       off += 4 * B;
        r->direction = (const int32_t *)(b + off); off += 4 * B;
        r->proba = (const float *)(b + off);       off += 4 * B * x->n_classes;
        r->rates = (const float *)(b + off);
    } else if (r->header.body_bytes) {
        char *j = (char *)malloc(r->header.body_bytes + 1);
        if (!j) return SVAE_E_ZMQ;
        memcpy(j, b, r->header.body_bytes);
        j[r->header.body_bytes] = 0;
        r->json = j;
    }
    return r->header.status ? SVAE_E_SERVICE : SVAE_OK;
}

/* Control requests: PING, INFO, STATS (JSON in r->json). */
static inline int svae_control(void *sock, uint8_t msg_type, uint64_t seq, svae_reply *r) {
    svae_request_header h;
    svae_request_init(&h, msg_type, seq);
    return svae_exchange(sock, &h, NULL, 0, r);
}

/* Decode n_bins bins of n_channels values of the given dtype (row-major). */
static inline int svae_decode(void *sock, uint64_t seq, const void *counts, uint8_t dtype, size_t itemsize,
                              uint32_t n_channels, uint32_t n_bins, svae_reply *r) {
    svae_request_header h;
    svae_request_init(&h, SVAE_DECODE, seq);
    h.dtype = dtype;
    h.n_channels = n_channels;
    h.n_bins = n_bins;
    return svae_exchange(sock, &h, counts, (size_t)n_channels * n_bins * itemsize, r);
}

static inline int svae_decode_f32(void *sock, uint64_t seq, const float *counts, uint32_t n_channels, svae_reply *r) {
    return svae_decode(sock, seq, counts, SVAE_FLOAT32, sizeof(float), n_channels, 1, r);
}

#endif
