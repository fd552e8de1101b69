"""The soak and fault benchmark, short (``benchmarks/soak.py --quick``): a 1 kHz closed loop, a
well-behaved bulk client and a stream, with malformed messages, oversize and multipart
frames, bulk floods, a client and a subscriber that never read and a STATS flood interleaved,
against the tiny bundle. No crash, no valid request lost or wrong, memory bounded."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_service import ROOT

pytestmark = pytest.mark.slow  # a subprocess suite: make test-fast leaves it out


def test_quick_soak(tiny_bundle, tmp_path):
    out = tmp_path / "soak.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--quick", "--bundle", str(tiny_bundle),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)
    r = json.loads(out.read_text())
    assert r["crashes"] == 0 and r["roles_failed"] == [] and r["server_exit"] == 0, r
    assert r["valid_lost"] == 0 and r["valid_wrong"] == 0, r["roles"]
    assert r["messages_sent"] >= 2000 and r["closed_loop"]["answered"] >= 5000
    assert r["rss_mb"]["peak"] < 3 * r["rss_mb"]["idle"], r["rss_mb"]
    st = r["server_stats"]
    assert st["errors"]["BAD_ENVELOPE"] > 0 and st["dropped"]["rate_limited"] > 0  # the attacks landed
    assert st["dropped"]["stream_gaps"] == 0  # the stream lost nothing
