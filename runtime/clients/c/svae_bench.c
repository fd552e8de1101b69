/* svae_bench: the round trip a C/C++ rig sees, one-bin float32 DECODEs of one stream.
 *
 *     svae_bench ENDPOINT N_CHANNELS COUNT [RATE_HZ [WARMUP]]
 *
 * Sends WARMUP (default 200) decodes back to back, then COUNT decodes, back to back (RATE_HZ 0,
 * the default) or one every 1/RATE_HZ s on a fixed schedule (clock_nanosleep to an absolute
 * time: a late reply shortens the next pause, never shifts the schedule), and prints one JSON
 * line of round-trip percentiles and the median of the replies' server_ns, in microseconds:
 *     {"n": 3000, "rate_hz": 0, "p50_us": 95.1, "p99_us": 180.2, "p999_us": 410.0, "server_p50_us": 40.3}
 * The counts are fixed (2 per channel); N_CHANNELS must be the bundle's. Used by
 * benchmarks/latency.py beside its Python client. Exit status 1 on a timeout or error reply.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "svae_client.h"

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double pct(const uint64_t *sorted, size_t n, double q) {
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return (double)sorted[i < n ? i : n - 1] / 1e3;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s ENDPOINT N_CHANNELS COUNT [RATE_HZ [WARMUP]]\n", argv[0]);
        return 2;
    }
    uint32_t n = (uint32_t)strtoul(argv[2], NULL, 10);
    size_t count = (size_t)strtoul(argv[3], NULL, 10);
    double rate = argc > 4 ? atof(argv[4]) : 0.0;
    size_t warmup = argc > 5 ? (size_t)strtoul(argv[5], NULL, 10) : 200;
    if (n < 1 || count < 1 || rate < 0) {
        fprintf(stderr, "N_CHANNELS and COUNT must be >= 1 and RATE_HZ >= 0\n");
        return 2;
    }
    float *x = (float *)malloc(n * sizeof(float));
    uint64_t *rtt = (uint64_t *)malloc(count * sizeof(uint64_t));
    uint64_t *srv = (uint64_t *)malloc(count * sizeof(uint64_t));
    void *ctx = zmq_ctx_new();
    void *sock = svae_connect(ctx, argv[1], 5000);
    svae_reply r = {0};
    int rc = 1;
    if (!x || !rtt || !srv || !sock) { fprintf(stderr, "cannot set up (memory or %s)\n", argv[1]); goto out; }
    for (uint32_t i = 0; i < n; i++) x[i] = 2.0f;
    uint64_t seq = 1;
    for (size_t i = 0; i < warmup; i++)
        if (svae_decode_f32(sock, seq++, x, n, i == 0, &r) != SVAE_OK) { fprintf(stderr, "warm-up failed\n"); goto out; }
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    long period_ns = rate > 0 ? (long)(1e9 / rate) : 0;
    for (size_t i = 0; i < count; i++) {
        if (period_ns) {
            next.tv_nsec += period_ns;
            while (next.tv_nsec >= 1000000000L) { next.tv_nsec -= 1000000000L; next.tv_sec++; }
            clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        }
        int e = svae_decode_f32(sock, seq++, x, n, 0, &r);
        if (e != SVAE_OK) {
            fprintf(stderr, "decode failed: %d %s %s\n", e, svae_strerror(e), r.json ? r.json : "");
            goto out;
        }
        rtt[i] = r.rtt_ns;
        srv[i] = r.header.server_ns;
    }
    qsort(rtt, count, sizeof(uint64_t), cmp_u64);
    qsort(srv, count, sizeof(uint64_t), cmp_u64);
    printf("{\"n\": %zu, \"rate_hz\": %g, \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
           "\"server_p50_us\": %.1f}\n", count, rate, pct(rtt, count, 0.5), pct(rtt, count, 0.99),
           pct(rtt, count, 0.999), pct(srv, count, 0.5));
    rc = 0;
out:
    svae_reply_free(&r);
    if (sock) zmq_close(sock);
    zmq_ctx_term(ctx);
    free(x);
    free(rtt);
    free(srv);
    return rc;
}
