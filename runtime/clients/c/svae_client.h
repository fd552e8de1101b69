/* svae_client.h: a minimal C client for the swapvae decoding service, wire protocol v2.
 *
 * Written from schemas/PROTOCOL.md alone (that is its purpose: it proves the spec is enough).
 * Header-only: copy it with svae_protocol.h (the protocol and the reply parser, which this file
 * includes). Needs libzmq (Debian: libzmq3-dev) and a little-endian host.
 *
 *     void *ctx = zmq_ctx_new();
 *     void *sock = svae_connect(ctx, "tcp://127.0.0.1:5555", 100);    // DEALER, 100 ms timeouts
 *     // or, with CURVE: svae_read_curve_key("server.key", srv, NULL); svae_read_curve_key("me.key_secret", pub, sec);
 *     //                 sock = svae_connect_curve(ctx, "tcp://rig:5555", 100, srv, pub, sec);
 *     svae_reply r = {0};
 *     if (svae_decode_f32(sock, seq, counts, n_channels, first_bin_of_trial, &r) == 0)  // one bin of float32 counts
 *         use(r.angle[0], r.direction[0], r.velocity[0], r.velocity[1]);          // NULL without a readout
 *     svae_reply_free(&r);
 *
 * The socket is one stream for the server: it decodes each bin from a window of this socket's
 * preceding bins. Pass reset = 1 with a trial's first bin (the server then forgets the history);
 * a new socket (e.g. after a timeout) is a new stream. r.header.flags says whether the window
 * started afresh (SVAE_REPLY_RESET_APPLIED) and whether the readout's sections are there
 * (SVAE_REPLY_HAS_READOUT); r.header.server_ns and queue_ns are the server's times.
 *
 * Every reply goes through svae_parse_reply (see svae_protocol.h for what it guarantees) and must
 * answer the request sent (reply type, and n_bins for a decode) before any pointer is set, so a
 * server, or an impostor on the endpoint during a restart, cannot make these calls read outside
 * the reply: they return SVAE_E_REPLY with the reason in reply.reply_error.
 */
#ifndef SVAE_CLIENT_H
#define SVAE_CLIENT_H

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "svae_protocol.h"

/* The largest reply frame the client accepts (libzmq drops the connection of a bigger one, via
 * ZMQ_MAXMSGSIZE, before allocating it). The default holds a 4096-bin batch of a bundle with
 * about 1000 kept neurons; define it before including this file to change it. */
#ifndef SVAE_MAX_REPLY_BYTES
#define SVAE_MAX_REPLY_BYTES ((size_t)16 << 20)
#endif

/* A received reply. Pointers point into `frame`, valid until the next call with this svae_reply;
 * call svae_reply_free when done with it. The frame is a malloc'd buffer, so the typed section
 * pointers are 4-byte aligned. */
typedef struct {
    svae_reply_header header;
    const float *content, *style_mean, *rates;   /* DECODE_REPLY: n_bins rows each, else NULL */
    const float *angle, *proba, *velocity;       /* ... with SVAE_REPLY_HAS_READOUT, else NULL */
    const int32_t *direction;   /* (readout) values as the server sent them: check before indexing with one */
    const char *json;           /* INFO/STATS/ERROR body, NUL-terminated (in frame), else NULL */
    size_t json_len;
    uint64_t rtt_ns;            /* measured here, send to receipt */
    int reply_error;            /* after SVAE_E_REPLY: why (SVAE_E_*, see svae_strerror), else 0 */
    svae_reply_view view;       /* the parsed reply (sections with their row counts and widths) */
    uint32_t *frame;            /* owned buffer: the last reply frame and a NUL after it */
    size_t frame_cap;
} svae_reply;

static inline int svae_little_endian(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

/* A monotonic clock in nanoseconds, for t_client_ns and the receive deadline. Define
 * SVAE_NOW_NS() (an expression of type uint64_t) to use your own, e.g. the rig's timebase.
 * Otherwise: QueryPerformanceCounter on Windows, clock_gettime(CLOCK_MONOTONIC) where POSIX
 * declares it (glibc in strict C99 needs _POSIX_C_SOURCE=200809L: the CMake target and the
 * pkg-config file add it), or a clear compile error. */
#if defined(SVAE_NOW_NS)
static inline uint64_t svae_now_ns(void) { return (uint64_t)(SVAE_NOW_NS()); }
#elif defined(_WIN32)
#include <windows.h>
static inline uint64_t svae_now_ns(void) {
    LARGE_INTEGER freq, count;
    QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&count);
    return (uint64_t)(count.QuadPart / freq.QuadPart) * 1000000000u +
           (uint64_t)(count.QuadPart % freq.QuadPart) * 1000000000u / (uint64_t)freq.QuadPart;
}
#elif defined(CLOCK_MONOTONIC)
static inline uint64_t svae_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#else
#error "svae_client.h: no monotonic clock declared here; compile with -D_POSIX_C_SOURCE=200809L, or define SVAE_NOW_NS()"
#endif

/* Replies libzmq may queue for this socket: SVAE_RECV_BUDGET bytes of the largest reply (at least 2). */
#ifndef SVAE_RECV_BUDGET
#define SVAE_RECV_BUDGET ((size_t)64 << 20)
#endif

/* A DEALER socket connected to `endpoint` with send/receive timeouts, no linger, the reply size
 * limit and a receive queue of SVAE_RECV_BUDGET bytes at most; with CURVE when `server_public`
 * is not NULL (PROTOCOL.md section 1.2: the server's public key and this client's key pair, each a
 * 40-character Z85 string, e.g. read by svae_read_curve_key). NULL on failure. */
static inline void *svae_connect_curve(void *ctx, const char *endpoint, int timeout_ms, const char *server_public,
                                       const char *client_public, const char *client_secret) {
    if (!svae_little_endian()) return NULL; /* the request struct is sent as raw bytes */
    void *s = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0, sndhwm = 16;
    int rcvhwm = SVAE_RECV_BUDGET / SVAE_MAX_REPLY_BYTES < 2 ? 2 : (int)(SVAE_RECV_BUDGET / SVAE_MAX_REPLY_BYTES);
    int64_t max_size = (int64_t)SVAE_MAX_REPLY_BYTES;
    if (!s) return NULL;
    if (zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero) || zmq_setsockopt(s, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms) ||
        zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout_ms, sizeof timeout_ms) ||
        zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &max_size, sizeof max_size) ||
        zmq_setsockopt(s, ZMQ_RCVHWM, &rcvhwm, sizeof rcvhwm) || zmq_setsockopt(s, ZMQ_SNDHWM, &sndhwm, sizeof sndhwm))
        goto fail;
    if (server_public) {
        if (!client_public || !client_secret || strlen(server_public) != 40 || strlen(client_public) != 40 ||
            strlen(client_secret) != 40)
            goto fail;
        if (zmq_setsockopt(s, ZMQ_CURVE_SERVERKEY, server_public, 41) ||
            zmq_setsockopt(s, ZMQ_CURVE_PUBLICKEY, client_public, 41) ||
            zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, client_secret, 41))
            goto fail;
    }
    if (zmq_connect(s, endpoint)) goto fail;
    return s;
fail:
    zmq_close(s);
    return NULL;
}

/* The same without CURVE. */
static inline void *svae_connect(void *ctx, const char *endpoint, int timeout_ms) {
    return svae_connect_curve(ctx, endpoint, timeout_ms, NULL, NULL, NULL);
}

/* Read a CURVE certificate file as `swapvae keygen curve` (or pyzmq's zmq.auth) writes it: the
 * Z85 `public-key` into public_out and, if there is one, the `secret-key` into secret_out (else
 * ""), each 41 bytes with the NUL. Either output may be NULL. 0, or -1 if the file cannot be read
 * or has no 40-character public key. */
static inline int svae_read_curve_key(const char *path, char public_out[41], char secret_out[41]) {
    char line[512];
    int found = 0;
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    if (public_out) public_out[0] = 0;
    if (secret_out) secret_out[0] = 0;
    while (fgets(line, sizeof line, f)) {
        const char *names[2] = {"public-key", "secret-key"};
        char *outs[2] = {public_out, secret_out};
        for (int k = 0; k < 2; k++) {
            const char *p = strstr(line, names[k]), *q;
            if (!p || line[0] == '#') continue;
            p = strchr(p, '"');
            q = p ? strchr(p + 1, '"') : NULL;
            if (!q || q - p - 1 != 40) continue;
            if (outs[k]) { memcpy(outs[k], p + 1, 40); outs[k][40] = 0; }
            if (k == 0) found = 1;
        }
    }
    fclose(f);
    return found ? 0 : -1;
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
    memset(r, 0, sizeof *r);
}

/* Clear everything a previous reply left in `r` except the buffer. */
static inline void svae_reply_clear(svae_reply *r) {
    uint32_t *frame = r->frame;
    size_t cap = r->frame_cap;
    memset(r, 0, sizeof *r);
    r->frame = frame;
    r->frame_cap = cap;
}

/* Receive one frame into r->frame (grown as needed, NUL after the frame); its length in *len.
 * The remaining parts of a multi-part message are drained and it is refused. */
static inline int svae_recv_frame(void *sock, svae_reply *r, size_t *len) {
    zmq_msg_t m;
    size_t size, need;
    int more, multipart;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, sock, 0) < 0) {
        int e = zmq_errno();
        zmq_msg_close(&m);
        return e == EAGAIN ? SVAE_E_TIMEOUT : SVAE_E_ZMQ;
    }
    size = zmq_msg_size(&m);
    multipart = more = zmq_msg_more(&m);
    while (more) {  /* the parts of one message arrive together: no waiting here */
        if (zmq_msg_recv(&m, sock, 0) < 0) break;
        more = zmq_msg_more(&m);
    }
    if (multipart) {
        zmq_msg_close(&m);
        r->reply_error = SVAE_E_MULTIPART;
        return SVAE_E_REPLY;
    }
    if (size > SVAE_MAX_REPLY_BYTES || svae_add_size(size, 1, &need)) {
        zmq_msg_close(&m);
        r->reply_error = SVAE_E_TOO_BIG;
        return SVAE_E_REPLY;
    }
    if (need > r->frame_cap) {
        size_t cap = need < ((size_t)1 << 16) ? ((size_t)1 << 16) : need;
        void *f = realloc(r->frame, cap);
        if (!f) { zmq_msg_close(&m); return SVAE_E_NOMEM; }
        r->frame = (uint32_t *)f;
        r->frame_cap = cap;
    }
    if (size) memcpy(r->frame, zmq_msg_data(&m), size);
    ((unsigned char *)r->frame)[size] = 0;
    zmq_msg_close(&m);
    *len = size;
    return SVAE_OK;
}

/* Send one request frame (header + body) and receive the reply with the same seq into `r`.
 * Replies with another seq (late answers to earlier requests) are skipped, within the socket's
 * receive timeout counted from the send. Returns SVAE_OK, SVAE_E_SERVICE (an ERROR reply: status
 * and json are set), or another SVAE_E_* code with no section pointer set. */
static inline int svae_exchange(void *sock, const svae_request_header *h, const void *body, size_t body_len,
                                svae_reply *r) {
    size_t len, n;
    uint8_t stack[4096];
    uint8_t *req;
    uint64_t t0 = svae_now_ns(), t1 = t0;
    int rc, timeout_ms = -1, left_ms, shortened = 0;
    size_t optlen = sizeof timeout_ms;
    svae_reply_clear(r);
    if (svae_add_size(sizeof *h, body_len, &len) || (body_len && !body)) return SVAE_E_ARG;
    req = len <= sizeof stack ? stack : (uint8_t *)malloc(len);
    if (!req) return SVAE_E_NOMEM;
    memcpy(req, h, sizeof *h);
    if (body_len) memcpy(req + sizeof *h, body, body_len);
    rc = zmq_send(sock, req, len, 0);
    if (req != stack) free(req);
    if (rc < 0) return zmq_errno() == EAGAIN ? SVAE_E_TIMEOUT : SVAE_E_ZMQ;
    if (zmq_getsockopt(sock, ZMQ_RCVTIMEO, &timeout_ms, &optlen)) timeout_ms = -1;
    for (;;) {
        rc = svae_recv_frame(sock, r, &n);
        if (rc != SVAE_OK) break;
        t1 = svae_now_ns();
        rc = svae_parse_reply(r->frame, n, &r->view);
        if (rc == SVAE_OK && r->view.header.seq != h->seq) {  /* a late reply: skip it */
            if (timeout_ms < 0) continue;
            left_ms = timeout_ms - (int)((t1 - t0) / 1000000u);
            if (left_ms <= 0) { rc = SVAE_E_TIMEOUT; break; }
            zmq_setsockopt(sock, ZMQ_RCVTIMEO, &left_ms, sizeof left_ms);
            shortened = 1;
            continue;
        }
        if (rc == SVAE_OK) rc = svae_reply_answers(&r->view, h->msg_type, h->n_bins);
        if (rc != SVAE_OK) { r->reply_error = rc; rc = SVAE_E_REPLY; }
        break;
    }
    if (shortened) zmq_setsockopt(sock, ZMQ_RCVTIMEO, &timeout_ms, sizeof timeout_ms);
    if (rc != SVAE_OK) {
        int reply_error = r->reply_error;
        svae_reply_clear(r);
        r->reply_error = reply_error;
        return rc;
    }
    r->rtt_ns = t1 - t0;
    r->header = r->view.header;
    if (r->header.msg_type == SVAE_DECODE_REPLY) {  /* malloc'd frame: the sections are aligned */
        const svae_array *s = r->view.section;
        r->content = (const float *)(const void *)s[SVAE_SEC_CONTENT].data;
        r->style_mean = (const float *)(const void *)s[SVAE_SEC_STYLE_MEAN].data;
        r->angle = (const float *)(const void *)s[SVAE_SEC_ANGLE].data;
        r->direction = (const int32_t *)(const void *)s[SVAE_SEC_DIRECTION].data;  /* NULL when absent */
        r->proba = (const float *)(const void *)s[SVAE_SEC_PROBA].data;
        r->velocity = (const float *)(const void *)s[SVAE_SEC_VELOCITY].data;
        r->rates = (const float *)(const void *)s[SVAE_SEC_RATES].data;
    } else if (r->view.json) {  /* the buffer holds a NUL after the frame and none inside the body */
        r->json = r->view.json;
        r->json_len = r->view.json_len;
    }
    return r->header.status ? SVAE_E_SERVICE : SVAE_OK;
}

/* Control requests: PING, INFO, STATS (JSON in r->json). */
static inline int svae_control(void *sock, uint8_t msg_type, uint64_t seq, svae_reply *r) {
    svae_request_header h;
    svae_request_init(&h, msg_type, seq);
    return svae_exchange(sock, &h, NULL, 0, r);
}

/* Decode n_bins consecutive bins of this socket's stream, n_channels values of the given dtype
 * each (row-major); reset != 0: the first of them starts a trial (SVAE_FLAG_RESET). */
static inline int svae_decode(void *sock, uint64_t seq, const void *counts, uint8_t dtype, size_t itemsize,
                              uint32_t n_channels, uint32_t n_bins, int reset, svae_reply *r) {
    svae_request_header h;
    size_t body_len;
    if (svae_mul_size(n_channels, n_bins, &body_len) || svae_mul_size(body_len, itemsize, &body_len)) {
        svae_reply_clear(r);
        return SVAE_E_ARG;
    }
    svae_request_init(&h, SVAE_DECODE, seq);
    h.dtype = dtype;
    h.flags = reset ? SVAE_FLAG_RESET : 0;
    h.n_channels = n_channels;
    h.n_bins = n_bins;
    return svae_exchange(sock, &h, counts, body_len, r);
}

static inline int svae_decode_f32(void *sock, uint64_t seq, const float *counts, uint32_t n_channels, int reset,
                                  svae_reply *r) {
    return svae_decode(sock, seq, counts, SVAE_FLOAT32, sizeof(float), n_channels, 1, reset, r);
}

#endif
