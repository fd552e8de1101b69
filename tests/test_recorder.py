"""What STATS reports (runtime/serve/recorder.py): the rings of the latest one-bin decodes'
server and queue times, their histogram summaries through wraps, and the counters."""
from __future__ import annotations

import numpy as np
import pytest

from swapvae.runtime.serve.recorder import Recorder


def test_recorder_rings_every_coalesced_decode_and_counts_what_stats_reports():
    with pytest.raises(ValueError, match="power of two"):
        Recorder(6)
    r = Recorder(8)
    r.decoded(1_000)
    r.decoded_together(np.array([5_000, 6_000, 7_000]), np.array([1_000, 2_000, 3_000]))  # one call, three requests
    lat, queue = r.latency(), r.latency(queue=True)
    # max and mean exact; percentiles the nearest rank's histogram bucket (within 1/64)
    assert lat.n == 4 and lat.max == 7.0 and lat.mean == 4.75 and lat.p50 == pytest.approx(5.0, rel=1 / 64)
    assert r.coalesced == 3 and lat.p99 == pytest.approx(7.0, rel=1 / 64) and lat.p99 <= lat.max
    assert queue.n == 4 and queue.max == 3.0 and queue.p50 == pytest.approx(1.0, rel=1 / 64)
    for _ in range(10):
        r.decoded(2_000, 500)
    r.multi_bin(7)
    r.error("BAD_SHAPE")
    r.control("PING")
    st = r.stats(prewarms=2, busy_poll=False, provider="cpu", streams=(3, 4, 5))
    assert st.latency_us.n == 8 and st.latency_us.max == 2.0  # the window holds the latest 8
    assert st.queue_us.n == 8 and st.queue_us.max == 0.5 and st.work_us.max == st.work_us.mean == 1.5
    assert (st.decodes, st.bins, st.coalesced, st.prewarms) == (14 + 1, 14 + 7, 3, 2)
    assert (st.streams, st.streams_evicted, st.max_streams) == (3, 4, 5)
    assert st.by_type == {"PING": 1, "DECODE": 15} and st.errors == {"BAD_SHAPE": 1}


def test_stats_histograms_follow_the_ring_through_wraps():
    """Folded a little at a time or not at all between wraps, the summaries equal those of the
    window's exact values, up to a bucket (1/64) for the percentiles."""
    rng = np.random.default_rng(5)
    r = Recorder(64)
    srv, que = [], []
    for step in range(60):
        n = int(rng.choice([1, 3, 40, 150]))
        s_ns = rng.lognormal(11, 1, n).astype(np.int64)
        q_ns = (s_ns * rng.uniform(0, 1, n)).astype(np.int64)
        if step % 3:
            for a, b in zip(s_ns, q_ns):
                r.decoded(int(a), int(b))
        else:
            r.decoded_together(s_ns, q_ns)
        srv += s_ns.tolist()
        que += q_ns.tolist()
        if step % 4 == 0:
            continue  # no STATS this time: the next fold covers more (or rebuilds)
        lat, queue = r.latency(), r.latency(queue=True)
        w, wq = np.array(srv[-64:]), np.array(que[-64:])
        assert lat.n == len(w) and lat.max == w.max() / 1e3 and lat.mean == pytest.approx(w.mean() / 1e3)
        assert queue.max == wq.max() / 1e3 and r._summaries()[2].max == (w - wq).max() / 1e3
        for p, got in ((50, lat.p50), (99, lat.p99)):
            exact = np.sort(w)[max(0, int(np.ceil(p / 100 * len(w))) - 1)] / 1e3
            assert got == pytest.approx(exact, rel=1 / 64), p
