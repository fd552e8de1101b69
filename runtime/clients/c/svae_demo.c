/* svae_demo: talk to a running `swapvae serve` from C.
 *
 *     svae_demo ENDPOINT [TIMEOUT_MS [SERVER_KEY CLIENT_KEY_SECRET]] < bins.txt
 *
 * With the two key files (`swapvae keygen curve`: the server's NAME.key and this client's
 * NAME.key_secret) it talks CURVE (PROTOCOL.md section 1.2).
 * Asks INFO for the channel count, then decodes one bin per input line (whitespace-separated
 * counts), the lines being consecutive bins of one trial (RESET with the first), and prints one
 * line per reply:
 *     decode seq=3 direction=3 angle=0.785398185 velocity=1.5,-2 flags=3 server_ns=41000 queue_ns=0 rtt_ns=90000
 * (direction=- angle=- velocity=- for a bundle without a readout)
 * then sends a bin with one channel too few and prints the error reply:
 *     error seq=N status=5 body={"code":5,"error":"BAD_SHAPE","message":"..."}
 * Exit status 0 on success, 1 on a timeout or protocol failure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svae_client.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s ENDPOINT [TIMEOUT_MS [SERVER_KEY CLIENT_KEY_SECRET]] < bins.txt\n", argv[0]);
        return 2;
    }
    int timeout = argc > 2 ? atoi(argv[2]) : 1000;
    char server_key[41], client_public[41], client_secret[41];
    int curve = argc > 4;
    if (curve && (svae_read_curve_key(argv[3], server_key, NULL) ||
                  svae_read_curve_key(argv[4], client_public, client_secret) || !client_secret[0])) {
        fprintf(stderr, "cannot read the CURVE keys %s and %s\n", argv[3], argv[4]);
        return 2;
    }
    void *ctx = zmq_ctx_new();
    void *sock = curve ? svae_connect_curve(ctx, argv[1], timeout, server_key, client_public, client_secret)
                       : svae_connect(ctx, argv[1], timeout);
    svae_reply r = {0};
    uint64_t seq = 1;
    int rc = 1;
    if (!sock) { fprintf(stderr, "cannot connect to %s\n", argv[1]); goto out; }

    if (svae_control(sock, SVAE_PING, seq++, &r) != SVAE_OK) { fprintf(stderr, "no PONG\n"); goto out; }
    printf("pong rtt_ns=%llu\n", (unsigned long long)r.rtt_ns);
    if (svae_control(sock, SVAE_INFO, seq++, &r) != SVAE_OK || !r.json) { fprintf(stderr, "no INFO\n"); goto out; }
    const char *key = strstr(r.json, "\"n_channels\":");
    if (!key) { fprintf(stderr, "INFO without n_channels\n"); goto out; }
    unsigned long nl = strtoul(key + strlen("\"n_channels\":"), NULL, 10);
    if (nl < 1 || nl > (1ul << 20)) { fprintf(stderr, "INFO n_channels=%lu is out of range\n", nl); goto out; }
    uint32_t n = (uint32_t)nl;  /* 0 would make the malformed request below send 2^32 - 1 channels */
    printf("info n_channels=%u\n", n);

    float *x = (float *)calloc(n, sizeof(float));
    int first = 1;  /* the first bin starts a trial */
    if (!x) goto out;
    for (;;) {
        uint32_t i;
        for (i = 0; i < n; i++)
            if (scanf("%f", &x[i]) != 1) break;
        if (i == 0) break;
        if (i != n) { fprintf(stderr, "a line had %u of %u counts\n", i, n); free(x); goto out; }
        int e = svae_decode_f32(sock, seq, x, n, first, &r);
        if (e != SVAE_OK) {
            fprintf(stderr, "decode seq=%llu failed: %d %s (%s) %s\n", (unsigned long long)seq, e, svae_strerror(e),
                    svae_strerror(r.reply_error), r.json ? r.json : "");
            free(x);
            goto out;
        }
        first = 0;
        printf("decode seq=%llu ", (unsigned long long)seq);
        if (r.header.flags & SVAE_REPLY_HAS_READOUT) {
            printf("direction=%d angle=%.9g velocity=", r.direction[0], r.angle[0]);
            for (i = 0; i < r.header.velocity_dim; i++) printf("%s%.9g", i ? "," : "", r.velocity[i]);
        } else {
            printf("direction=- angle=- velocity=-");
        }
        printf(" flags=%u server_ns=%u queue_ns=%u rtt_ns=%llu\n", r.header.flags, r.header.server_ns,
               r.header.queue_ns, (unsigned long long)r.rtt_ns);
        seq++;
    }
    /* A malformed request: the server answers with an error and keeps serving. */
    int e = svae_decode_f32(sock, seq, x, n - 1, 0, &r);
    free(x);
    if (e != SVAE_E_SERVICE) {
        fprintf(stderr, "expected an error reply, got %d (%s)\n", e, svae_strerror(e));
        goto out;
    }
    printf("error seq=%llu status=%u body=%s\n", (unsigned long long)r.header.seq, r.header.status, r.json);
    rc = 0;
out:
    svae_reply_free(&r);
    if (sock) zmq_close(sock);
    zmq_ctx_term(ctx);
    return rc;
}
