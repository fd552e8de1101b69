"""The Lab Streaming Layer in and out: ``swapvae serve BUNDLE --lsl-in QUERY --lsl-out NAME`` and
``swapvae play RECORDING --lsl NAME`` (pylsl, from the ``[lsl]`` extra; the only module that
imports it).

**In.** The input stream is found by name, or by an LSL predicate (XPath 1.0 on the stream's
info, e.g. ``name='rig1' and type='spikes'``), and checked against the bundle before anything
is served (``check_input``: format, channel count, nominal rate; a mismatch names both values).
It is one of three kinds:

- ``counts``: one sample a bin of spike counts, ``n_channels`` wide, at the bundle's rate;
- ``fine``: one sample a finer bin of counts (e.g. 1 or 20 ms) whose period divides the
  bundle's bin: ``FineBinner`` sums ``m`` consecutive samples into one bin;
- ``spikes``: one sample a spike, its one value the channel (0-based), its timestamp the
  spike's time. ``SpikeBinner`` puts it in the bin ``[k*b, (k+1)*b)`` of the LSL clock (``b``
  the bundle's bin size), exactly as ``np.histogram`` over those edges would, and closes a bin
  when a later spike or the clock (``close_after_s`` past the bin's end: spikes still in
  flight) says it is complete. Empty bins are bins too: silence is data.

With ``step_s`` (``--lsl-step-ms``) finer than the bin, fine samples or spikes are binned into
steps of that length instead, and ``SlidingWindowDecoder`` (runtime/window.py) decodes the sum
of the last ``bin / step`` steps at every step: a full-size bin, as in training, every step.

**Out.** Each bin is decoded with its stream's own history (one stream, as one ZeroMQ
client's) and pushed to an outlet of float32 channels: ``angle`` (radians), ``p_<class>``, the
velocity, ``content_<i>`` and, with ``rates``, ``rate_<neuron>``, labelled in LSL's usual
place (``desc/channels/channel/label``, with ``unit`` and ``type``). A decode carries the
timestamp of the input sample that completed its bin (for spikes, the bin's end), corrected by
the inlet to this machine's clock, so LSL's synchronisation lines it up with the recording.
A jump of more than 1.5 bins (steps) between bins (a new trial, a pause, lost samples), or back in time
(a new source, a replay), starts the history afresh, as a trial start (RESET) does over ZeroMQ.

**The freshest sample.** When the inlet has fallen behind (this process paused, a slow disk),
every waiting bin still goes through the history, in order, but with ``publish="newest"`` (the
default, for feedback) only the newest is pushed: a backlog is never sent downstream as if it
were current, and what is held back is counted (``stale_skipped``). ``publish="all"`` pushes
every decode (a recorder of the decodes wants them all). NaN, infinite or negative counts and
spike channels out of range are refused and counted (``bad_samples``); the bin after a refused
one starts the history afresh. The counters are the ``lsl`` section of the server's STATS.
liblsl's inlet recovers by itself when its stream disappears and comes back (the same source
id); meanwhile the ZeroMQ side serves on (the bridge runs in a thread of its own, with an
engine of its own).
"""
from __future__ import annotations

import math
import threading
import time

import numpy as np

from swapvae.runtime.serve.prewarm import WarmPlanner
from swapvae.runtime.window import SlidingWindowDecoder

KINDS = ("counts", "fine", "spikes")
PUBLISH = ("newest", "all")
GAP_BINS = 1.5  # a longer jump between bins starts the history afresh
CHUNK = 1024  # samples pulled at once at most


class LslInputError(ValueError):
    """The input stream does not fit the bundle (its value and the bundle's, both named)."""


def _lsl():
    try:
        import pylsl
    except ImportError:  # the message is the point; the CLI turns it into one line
        raise ModuleNotFoundError("the Lab Streaming Layer needs pylsl: pip install 'swapvae-bci[lsl]'",
                                  name="pylsl") from None
    return pylsl


# -- binning ----------------------------------------------------------------------------------
class FineBinner:
    """Fine-binned counts summed into bins of ``m`` consecutive fine samples. A fine sample more
    than 1.5 fine periods after the previous one drops the partial bin (lost samples: that bin
    would hold less than it should)."""

    def __init__(self, n_channels: int, m: int, fine_period_s: float):
        self.m, self.gap_s = m, GAP_BINS * fine_period_s
        self._sum, self._n, self._last = np.zeros(n_channels, np.float64), 0, -math.inf
        self._out = np.zeros(n_channels, np.float32)
        self.dropped = 0  # fine samples of partial bins dropped

    def push(self, x: np.ndarray, ts: float) -> np.ndarray | None:
        """One fine sample; the bin's counts when this sample completes it (a reused array)."""
        if self._n and ts - self._last > self.gap_s:
            self.dropped += self._n
            self.reset()
        self._last = ts
        self._sum += x
        self._n += 1
        if self._n < self.m:
            return None
        self._out[:] = self._sum
        self.reset()
        return self._out

    def reset(self) -> None:
        self._sum[:] = 0
        self._n = 0


class SpikeBinner:
    """Spike events (channel, time) into the counts of bins ``[t0 + k*b, t0 + (k+1)*b)``; ``t0``
    defaults to 0, the LSL clock's grid. Events come in time order (LSL keeps a stream's
    order); one for a bin already closed is counted ``late`` and dropped."""

    def __init__(self, n_channels: int, bin_s: float, t0: float = 0.0):
        self.n, self.bin_s, self.t0 = n_channels, bin_s, t0
        self.k: int | None = None  # the open bin (None before the first spike)
        self._counts = np.zeros(n_channels, np.float32)
        self.late = 0

    def index(self, t: float) -> int:
        """The bin of ``t``, compared against the edges ``t0 + k*b`` themselves (a division alone
        can round a time on an edge into the bin before it)."""
        k = math.floor((t - self.t0) / self.bin_s)
        if t < self.t0 + k * self.bin_s:
            return k - 1
        return k + 1 if t >= self.t0 + (k + 1) * self.bin_s else k

    def push(self, channel: int, t: float) -> list[tuple[np.ndarray, float]]:
        """Add one spike; the bins it closed (empty ones between included) as (counts, end time)."""
        k = self.index(t)
        if self.k is None:
            self.k = k
        if k < self.k:
            self.late += 1
            return []
        closed = self._close_until(k)
        self._counts[channel] += 1
        return closed

    def close_until(self, t: float) -> list[tuple[np.ndarray, float]]:
        """The open bins that end at or before ``t`` (the clock's word that their spikes are all in)."""
        return [] if self.k is None else self._close_until(self.index(t))

    def _close_until(self, k: int) -> list[tuple[np.ndarray, float]]:
        closed = []
        while self.k < k:
            self.k += 1
            closed.append((self._counts.copy(), self.t0 + self.k * self.bin_s))
            self._counts[:] = 0
        return closed


# -- the input's checks and the outlet --------------------------------------------------------
NUMERIC = {1: "float32", 2: "double64", 4: "int32", 5: "int16", 6: "int8", 7: "int64"}  # pylsl's cf_* codes
NUMPY = {1: np.float32, 2: np.float64, 4: np.int32, 5: np.int16, 6: np.int8, 7: np.int64}


def check_input(info, manifest, kind: str) -> int:
    """Check the input stream (anything with pylsl StreamInfo's ``name``, ``channel_count``,
    ``channel_format``, ``nominal_srate``) against the bundle; the fine samples per bin (1 for
    ``counts`` and ``spikes``). LslInputError names the stream's value and the bundle's."""
    if kind not in KINDS:
        raise ValueError(f"--lsl-kind must be one of {', '.join(KINDS)}, got {kind!r}")
    name, n, fmt, rate = info.name(), info.channel_count(), info.channel_format(), info.nominal_srate()
    if fmt not in NUMERIC:
        what = "string" if fmt == 3 else f"format code {fmt}"
        raise LslInputError(f"stream {name!r} has channel format {what}; the bundle takes numbers "
                            f"({', '.join(NUMERIC.values())})")
    if kind == "spikes":
        if n != 1:
            raise LslInputError(f"spike stream {name!r} has {n} channels; a spike event has 1 (the unit's index, "
                                f"0..{manifest.n_channels - 1}, at the spike's timestamp)")
        return 1
    if n != manifest.n_channels:
        raise LslInputError(f"stream {name!r} has {n} channels; the bundle takes {manifest.n_channels} "
                            f"(one count per recorded channel)")
    bin_s = manifest.bin_size_s
    if kind == "counts":
        if rate > 0 and abs(rate * bin_s - 1) > 1e-6:
            raise LslInputError(f"stream {name!r} has a nominal rate of {rate:g} Hz; the bundle's bins are "
                                f"{bin_s * 1e3:g} ms ({1 / bin_s:g} Hz) (--lsl-kind fine sums finer bins)")
        return 1
    per_bin = rate * bin_s
    if rate <= 0 or round(per_bin) < 2 or abs(per_bin - round(per_bin)) > 1e-6 * per_bin:
        raise LslInputError(f"fine stream {name!r} has a nominal rate of {rate:g} Hz; the bundle's "
                            f"{bin_s * 1e3:g} ms bins need a rate that is a whole multiple (2 or more) of "
                            f"{1 / bin_s:g} Hz")
    return round(per_bin)


def output_channels(manifest, rates: bool) -> list[tuple[str, str, str]]:
    """The outlet's channels as (label, unit, type), in order."""
    ch = []
    if manifest.readout is not None:
        ch.append(("angle", "radians", "angle"))
        ch += [(f"p_{c}", "probability", "proba") for c in manifest.readout.direction.classes]
        ch += [(v, "data unit", "velocity") for v in manifest.readout.velocity]
    ch += [(f"content_{i}", "a.u.", "content") for i in range(manifest.content_dim)]
    if rates:
        unit = "Hz" if manifest.rates_unit == "hz" else "counts per bin"
        ch += [(f"rate_{j}", unit, "rates") for j in manifest.neurons]
    return ch


def make_outlet(name: str, manifest, rates: bool, source_id: str, bundle: str = ""):
    """The decodes' outlet, its channels described in ``desc/channels``."""
    pylsl = _lsl()
    channels = output_channels(manifest, rates)
    info = pylsl.StreamInfo(name, "SwapVAE", len(channels), 1.0 / manifest.bin_size_s, pylsl.cf_float32, source_id)
    xml = info.desc().append_child("channels")
    for label, unit, kind in channels:
        c = xml.append_child("channel")
        c.append_child_value("label", label)
        c.append_child_value("unit", unit)
        c.append_child_value("type", kind)
    info.desc().append_child("swapvae").append_child_value("bundle", str(bundle)).append_child_value(
        "bin_size_s", repr(manifest.bin_size_s))
    return pylsl.StreamOutlet(info)


def resolve(query: str, timeout_s: float):
    """The first stream found by name, or by predicate when ``query`` is one (has ``=`` or ``(``)."""
    pylsl = _lsl()
    pred = "=" in query or "(" in query
    found = pylsl.resolve_bypred(query, 1, timeout_s) if pred else pylsl.resolve_byprop("name", query, 1, timeout_s)
    if not found:
        raise LslInputError(f"no LSL stream {'matches' if pred else 'named'} {query!r} (waited {timeout_s:g} s)")
    return found[0]


def open_inlet(info, timeout_s: float):
    """An inlet that corrects timestamps to this clock and takes samples one by one (no sender
    chunking between the rig and the decode). It buffers liblsl's default 360 s of a regular
    stream (at its nominal rate: a player at 20 times it fills 18 s), and 10^6 samples of an
    irregular one (liblsl counts those in hundreds: 20 s of 1 000 units at 50 Hz)."""
    pylsl = _lsl()
    buflen = 360 if info.nominal_srate() > 0 else 10_000
    inlet = pylsl.StreamInlet(info, max_buflen=buflen, max_chunklen=1, recover=True,
                              processing_flags=pylsl.proc_clocksync)
    inlet.open_stream(timeout_s)
    return inlet


# -- the bridge -------------------------------------------------------------------------------
class LslBridge:
    """Inlet -> bins -> a decoder of its own -> outlet, in a thread of its own (``start``,
    ``stop``) or one ``step`` at a time. ``decoder`` is a BundleDecoder this bridge alone uses
    (its one-bin buffers are not shared between threads); ``inlet``/``outlet``: pylsl's or
    anything with their ``pull_chunk``/``push_chunk``; ``clock``: the inlet's clock
    (``pylsl.local_clock``), for closing spike bins."""

    def __init__(self, decoder, inlet, outlet, kind: str = "counts", per_bin: int = 1, rates: bool = False,
                 publish: str = "newest", stream: str = "", out_name: str = "", dtype=np.float32, clock=None,
                 close_after_s: float | None = None, prewarm: bool = True, step_s: float | None = None):
        if kind not in KINDS or publish not in PUBLISH:
            raise ValueError(f"kind must be one of {KINDS} and publish one of {PUBLISH}, got {kind!r}, {publish!r}")
        m = decoder.manifest
        # decodes more often than a bin: a sliding window of step-long bins (runtime/window.py)
        self.window = (SlidingWindowDecoder(decoder, step_s)
                       if step_s is not None and abs(step_s - m.bin_size_s) > 1e-9 * m.bin_size_s else None)
        k = self.window.k if self.window is not None else 1
        if self.window is not None and (kind == "counts" or kind == "fine" and per_bin % k):
            what = "a stream of whole bins" if kind == "counts" else f"fine samples of 1/{per_bin} bin"
            raise LslInputError(f"a decode every {step_s * 1e3:g} ms needs input finer than that: {what} cannot "
                                f"make {k} steps per bin (give fine samples or spikes)")
        self.decoder, self.inlet, self.outlet = decoder, inlet, outlet
        self.kind, self.rates, self.newest = kind, rates, publish == "newest"
        self.stream, self.out_name = stream, out_name
        self.n, self.bin_s, self.has_readout = m.n_channels, m.bin_size_s, m.readout is not None
        self.step_s = self.bin_s / k  # what one decode adds: a bin, or a step of the window
        self.history = decoder.new_stream()
        self.fine = FineBinner(self.n, per_bin // k, self.bin_s / per_bin) if kind == "fine" else None
        self.spikes = SpikeBinner(self.n, self.step_s) if kind == "spikes" else None
        self.close_after_s = self.step_s / 2 if close_after_s is None else close_after_s
        self.clock = clock if clock is not None else time.monotonic
        self._chunk = np.zeros((CHUNK, 1 if kind == "spikes" else self.n), dtype)
        self._row = np.zeros(len(output_channels(m, rates)), np.float32)
        self._bins: list[tuple[np.ndarray, float]] = []
        self._last_ts = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the thread warms the engine just before a steady stream's next bin is due, as the server does
        self.planner = WarmPlanner(decoder.warm if prewarm else None)
        self.samples = self.bins = self.published = self.stale_skipped = self.bad_samples = 0
        self.history_restarts = self.errors = 0
        self.last_error: str | None = None

    def stats(self) -> dict:
        return {"stream": self.stream, "kind": self.kind, "publish": "newest" if self.newest else "all",
                "samples": self.samples, "bins": self.bins, "published": self.published,
                "stale_skipped": self.stale_skipped, "bad_samples": self.bad_samples,
                "history_restarts": self.history_restarts,
                "late_spikes": self.spikes.late if self.spikes is not None else 0,
                "fine_dropped": self.fine.dropped if self.fine is not None else 0,
                "errors": self.errors, "last_error": self.last_error}

    def step(self, timeout_s: float = 0.1) -> int:
        """Take what the inlet holds (waiting up to ``timeout_s`` for a first sample), decode every
        whole bin in order and publish as the policy says; the bins decoded."""
        _, ts = self.inlet.pull_chunk(timeout=timeout_s, max_samples=CHUNK, dest_obj=self._chunk, min_samples=1)
        bins = self._bins
        bins.clear()
        for i, t in enumerate(ts):
            self._take(self._chunk[i], t, bins)
        self.samples += len(ts)
        if self.spikes is not None:
            bins += self.spikes.close_until(self.clock() - self.close_after_s)
        pending = None  # the newest decode's timestamp, its row packed (a refused bin after it may
        for x, t in bins:  # overwrite the engine's output buffers, never the packed row)
            out = self._decode(x, t)
            if out is None:
                continue
            if pending is not None:
                self.stale_skipped += 1
            self._pack(out)
            pending = t
            if not self.newest:
                self._publish(t)
                pending = None
        if pending is not None:
            self._publish(pending)
        return len(bins)

    def _take(self, row: np.ndarray, t: float, bins: list) -> None:
        if self.kind == "counts":
            bins.append((row, t))
        elif self.kind == "fine":
            if not (np.isfinite(row).all() and row.min() >= 0):
                self.bad_samples += 1
                self.fine.reset()
                self._last_ts = -math.inf
                return
            x = self.fine.push(row, t)
            if x is not None:
                bins.append((x.copy(), t))
        else:
            c = float(row[0])
            if not (0 <= c < self.n and c == int(c)):  # also False for NaN
                self.bad_samples += 1
                return
            bins += self.spikes.push(int(c), t)

    def _decode(self, x: np.ndarray, t: float):
        restart = not 0 < t - self._last_ts <= GAP_BINS * self.step_s  # a gap, or time going back: a new source
        try:
            if self.window is None:
                out = self.decoder.decode_stream(self.history, x, reset=restart)
            else:
                if restart:
                    self.window.reset()
                out = self.window.push(x)  # None while the first window fills
        except ValueError:  # NaN, infinite or negative counts: refused, the next bin starts afresh
            self.bad_samples += 1
            self._last_ts = -math.inf
            return None
        self._last_ts = t
        self.history_restarts += restart
        self.bins += out is not None  # None: the first window still fills
        return out

    def _pack(self, out) -> None:
        row, i = self._row, 0
        parts = (out.angle, out.proba[0], out.velocity[0]) if self.has_readout else ()
        parts += (out.content[0],) + ((out.rates[0],) if self.rates else ())
        for p in parts:
            row[i:i + len(p)] = p
            i += len(p)

    def _publish(self, t: float) -> None:
        self.outlet.push_chunk(self._row, t)  # one sample; pylsl's push_sample converts value by value
        self.published += 1

    # -- the thread -----------------------------------------------------------------------------
    def start(self) -> LslBridge:
        self._thread = threading.Thread(target=self._run, name="lsl-bridge", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        plan, clock = self.planner, time.perf_counter_ns
        while not self._stop.is_set():
            try:
                if plan.due and plan.due <= clock():
                    plan.warm()
                planned = plan.due
                wait = (planned - clock()) / 1e9 if planned else 0.1
                if self.step(min(max(wait, 0.0), 0.1)):
                    if planned:
                        plan.interrupted()
                    plan.arrived(clock())
            except Exception as e:  # a lost stream (recover=False) or liblsl's errors: counted, retried
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)


def bridge(bundle: str, query: str, out_name: str | None, kind: str = "counts", rates: bool = False,
           publish: str = "newest", wait_s: float = 30.0, provider: str = "cpu", trusted=None, prewarm: bool = True,
           step_ms: float | None = None, say=None) -> LslBridge:
    """``serve --lsl-in``: the outlet first (so a downstream program can connect before the input
    appears), then the input resolved, checked and opened; the bridge, not yet started."""
    from swapvae.runtime.engine import BundleDecoder

    pylsl = _lsl()
    decoder = BundleDecoder(bundle, provider=provider, trusted=trusted)
    m = decoder.manifest
    if out_name is None:
        out_name = "swapvae" if "=" in query or "(" in query else f"{query}-swapvae"
    outlet = make_outlet(out_name, m, rates, source_id=f"swapvae:{out_name}", bundle=bundle)
    if say:
        say(f"lsl: decodes go to the outlet {out_name!r}; waiting up to {wait_s:g} s for the input {query!r}")
    info = resolve(query, wait_s)
    per_bin = check_input(info, m, kind)
    inlet = open_inlet(info, wait_s)
    return LslBridge(decoder, inlet, outlet, kind, per_bin, rates, publish, stream=info.name(), out_name=out_name,
                     dtype=NUMPY[info.channel_format()], clock=pylsl.local_clock, prewarm=prewarm,
                     step_s=None if step_ms is None else step_ms / 1e3)


# -- the player -------------------------------------------------------------------------------
def play(counts: np.ndarray, trial: np.ndarray, bin_s: float, name: str, kind: str = "counts", speed: float = 1.0,
         wait_s: float = 30.0, seed: int = 0, linger_s: float = 2.0, say=None) -> dict:
    """Play bins ``counts`` (trials ``trial``, consecutive bins of a trial adjacent) into an LSL
    outlet named ``name``, at ``speed`` times their real rate, once a consumer is connected.

    Timestamps are on the recording's clock: bin ``i`` ends at ``T0 + (i + g + 1) * bin_s``,
    where ``g`` counts the trials begun before it (one empty bin between trials, so a consumer
    sees each trial start as a gap) and ``T0`` is a multiple of ``bin_s`` (the LSL clock's bin
    grid). ``counts`` pushes each bin as one sample at its end; ``spikes`` pushes each count as a
    spike (int32 channel) at a time drawn uniformly within its bin, 5% clear of its edges (so a
    clock correction of microseconds never moves one), the bin's spikes at its end."""
    pylsl = _lsl()
    if kind not in ("counts", "spikes"):
        raise ValueError(f"play --kind is counts or spikes, got {kind!r}")
    if speed <= 0:
        raise ValueError(f"--speed must be > 0, got {speed}")
    n_bins, n_ch = counts.shape
    slot = np.arange(n_bins) + np.cumsum(np.r_[False, trial[1:] != trial[:-1]])  # with a gap bin between trials
    if kind == "counts":
        info = pylsl.StreamInfo(name, "SpikeCounts", n_ch, 1.0 / bin_s, pylsl.cf_float32, f"swapvae-play:{name}")
    else:
        info = pylsl.StreamInfo(name, "Spikes", 1, pylsl.IRREGULAR_RATE, pylsl.cf_int32, f"swapvae-play:{name}")
    outlet = pylsl.StreamOutlet(info, chunk_size=1)
    if say:
        say(f"play: outlet {name!r} ({kind}, {n_bins} bins); waiting up to {wait_s:g} s for a consumer")
    if not outlet.wait_for_consumers(wait_s):
        raise RuntimeError(f"no consumer connected to the outlet {name!r} within {wait_s:g} s")
    rng = np.random.default_rng(seed)
    t0 = math.ceil((pylsl.local_clock() + 0.05) / bin_s) * bin_s
    wall0, spikes = time.perf_counter(), 0
    x = np.zeros(n_ch, np.float32)
    for i in range(n_bins):
        end = t0 + (slot[i] + 1) * bin_s
        wait = wall0 + (slot[i] + 1) * bin_s / speed - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        if kind == "counts":
            x[:] = counts[i]
            outlet.push_sample(x, end)
            continue
        ch = np.repeat(np.arange(n_ch, dtype=np.int32), counts[i].astype(np.int64))
        if len(ch):
            t = end - bin_s + bin_s * rng.uniform(0.05, 0.95, len(ch))
            order = np.argsort(t, kind="stable")
            outlet.push_chunk(ch[order].reshape(-1, 1), t[order].tolist())
            spikes += len(ch)
    seconds = time.perf_counter() - wall0
    time.sleep(linger_s)  # the outlet's end breaks its connections: let the consumers take the last samples first
    return {"bins": n_bins, "trials": int(slot[-1] - (n_bins - 1) + 1), "spikes": spikes, "t0": t0,
            "seconds": seconds}
