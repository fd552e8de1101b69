"""The causal history rule, offline (causal_windows) and online (StreamHistory, StreamTable)."""
import numpy as np
import pytest

from swapvae.runtime.history import StreamHistory, StreamTable, causal_windows


def _session(rng, lengths=(4, 1, 6, 3), d=3):
    trial = np.repeat(np.arange(len(lengths)) * 7 + 2, lengths)  # ids need not be consecutive
    return rng.normal(size=(len(trial), d)), trial


def test_windows_never_reach_before_their_trial():
    rng = np.random.default_rng(0)
    z, trial = _session(rng)
    w = causal_windows(z, trial, 4).reshape(len(z), 4, -1)
    starts = np.r_[0, np.flatnonzero(np.diff(trial)) + 1]
    for t in range(len(z)):
        start = starts[starts <= t].max()
        for lag in range(4):
            # the bin lag places back, or the trial's first bin where that is before the trial
            np.testing.assert_array_equal(w[t, lag], z[max(t - lag, start)])
    np.testing.assert_array_equal(causal_windows(z, trial, 1), z)
    with pytest.raises(ValueError, match="at least 1"):
        causal_windows(z, trial, 0)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_a_stream_reset_at_each_trial_gives_the_offline_windows(k):
    rng = np.random.default_rng(1)
    z, trial = _session(rng)
    ref = causal_windows(z, trial, k)
    s = StreamHistory(k, z.shape[1])
    for t in range(len(z)):
        if t == 0 or trial[t] != trial[t - 1]:
            s.reset()
        # the window the decode graph forms: [z_t, history] where a fresh stream repeats z_t
        past = np.tile(z[t], k - 1) if s.fresh else s.row
        np.testing.assert_allclose(np.r_[z[t], past], ref[t], rtol=1e-6)
        s.push(z[t])


def test_a_stream_never_reset_sees_its_own_preceding_bins():
    rng = np.random.default_rng(2)
    z, trial = _session(rng)
    s = StreamHistory(3, z.shape[1])
    for t in range(len(z)):
        if t >= 2:
            np.testing.assert_allclose(s.row, np.r_[z[t - 1], z[t - 2]], rtol=1e-6)
        s.push(z[t])
    np.testing.assert_allclose(s.row, np.r_[z[-1], z[-2]], rtol=1e-6)  # across trial boundaries too


def test_stream_table_is_bounded_and_evicts_the_least_recent():
    table = StreamTable(3, 2, max_streams=2)
    a = table.get(b"a")
    a.push(np.ones(2))
    table.get(b"b")
    assert table.get(b"a") is a and len(table) == 2  # "a" is now the most recent
    table.get(b"c")  # evicts "b"
    assert len(table) == 2 and table.evicted == 1
    assert table.get(b"a") is a and not a.fresh
    b = table.get(b"b")  # back as a new stream: its history is gone
    assert b.fresh and table.evicted == 2
    with pytest.raises(ValueError, match="max_streams"):
        StreamTable(3, 2, max_streams=0)
