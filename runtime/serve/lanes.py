"""The lanes behind the closed loop: bulk decodes served one slice (one engine call) at a time,
and requests that are not decodes served a few at a time, between turns of the serving loop,
so that a one-bin closed-loop request never waits behind more than one engine call of bulk
work or a few control replies (``ControlLane``, at the end). Both answer through ``Replies``
(runtime/serve/replies.py) and know nothing else of the server.

A DECODE of more than one bin is not decoded where it is read: it becomes a ``Job`` in the
queue of its stream, and so does every DECODE of that stream that arrives while the stream has
a queue here (a stream's bins are decoded in the order they came). The serving loop calls
``step`` once per turn, after serving whatever was ready on the sockets: one slice of the job
at the head of the next stream's queue, streams taking turns. A slice is as many bins as take
about ``slice_ns`` on this engine (measured as slices run). A finished job is answered at once.

The stream's history advances slice by slice, as one call would have advanced it; if a slice
fails (a NaN in its bins), the history is put back as it was before the job and the job gets
the ERROR: a refused request leaves its stream as it was, as everywhere.

What the lane holds is bounded: request bytes of all pending jobs at most ``bulk_bytes``, of one
peer at most ``bulk_peer_bytes`` (runtime/limits.py); beyond that a DECODE is answered
OVERLOADED at once. Times: ``server_ns`` runs from the read to the reply; ``queue_ns`` is all of
it not spent in the job's own slices (waiting for its turn, before and between slices).
"""
from __future__ import annotations

import time
from collections import deque

from swapvae.runtime import wire
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.replies import Replies
from swapvae.schemas.protocol import Bulk, ErrorCode

_clock = time.perf_counter_ns
MIN_SLICE_BINS = 8
SLICE_NS = 500_000  # default target time of one slice
BIG_REPLY = 64 << 10  # replies this big are handed to libzmq without a copy


class Job:
    """One DECODE request waiting in (or going through) the lane."""
    __slots__ = ("key", "src", "frames", "req", "nbytes", "t_read", "work", "done", "bundle", "stream", "fresh",
                 "frame", "views", "saved")

    def __init__(self, key, src, frames, req, nbytes: int, t_read: int):
        self.key, self.src, self.frames, self.req, self.nbytes, self.t_read = key, src, frames, req, nbytes, t_read
        self.work = self.done = 0
        self.bundle = None  # the bundle in service when its first slice runs


class BulkLane:
    """Queues of jobs by stream, and the slices that serve them (see the module doc).
    ``replies`` gives the bundle in service, the streams' histories and the error replies."""

    def __init__(self, replies: Replies, recorder: Recorder, slice_ns: int = SLICE_NS):
        self.replies, self.recorder, self.slice_ns = replies, recorder, int(slice_ns)
        self.queues: dict[bytes, deque] = {}  # stream key -> its jobs, in arrival order; dict order = turns
        self.bytes = 0
        self._bytes_of: dict[bytes, int] = {}
        self.slices = self.slice_max = 0
        self.ns_per_bin = 0.0  # smoothed cost of a bin in a slice, from the slices run

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def slice_bins(self, max_bins: int) -> int:
        per_bin = self.ns_per_bin or self.replies.bundle.ns_per_bin
        if not per_bin:  # nothing measured yet: a small first slice, which measures
            return MIN_SLICE_BINS
        return max(MIN_SLICE_BINS, min(max_bins, int(self.slice_ns / per_bin)))

    def stats(self) -> Bulk:
        return Bulk(pending=len(self), pending_bytes=self.bytes, slices=self.slices,
                    slice_bins=self.slice_bins(self.replies.bundle.limits.max_bins), slice_us=self.slice_ns / 1e3,
                    slice_max_us=self.slice_max / 1e3)

    def submit(self, key: bytes, src, frames: list, req, nbytes: int, t_read: int):
        """Queue a parsed DECODE; None, or the OVERLOADED reply when the lane is full."""
        limits = self.replies.bundle.limits
        mine = self._bytes_of.get(key, 0)
        if self.bytes + nbytes > limits.bulk_bytes or mine + nbytes > limits.bulk_peer_bytes:
            return self.replies.error(
                ErrorCode.OVERLOADED, f"the server holds {self.bytes} bytes of multi-bin decodes ({mine} from this "
                f"peer; at most {limits.bulk_bytes}, {limits.bulk_peer_bytes} per peer): retry when answered",
                req.seq, req.t_client_ns)
        self.queues.setdefault(key, deque()).append(Job(key, src, frames, req, nbytes, t_read))
        self.bytes += nbytes
        self._bytes_of[key] = mine + nbytes
        return None

    def step(self) -> None:
        """One slice of the job at the head of the next stream's queue; answer it if done."""
        key = next(iter(self.queues))
        queue = self.queues.pop(key)
        job = queue[0]
        try:
            reply = self._slice(job)
        except Exception as e:  # noqa: BLE001 - the lane outlives any engine failure
            reply = self._failed(job, e)
        if reply is not None:
            queue.popleft()
            self.bytes -= job.nbytes
            left = self._bytes_of.pop(key) - job.nbytes
            if left:
                self._bytes_of[key] = left
            job.src.answer(job.frames, reply, copy=len(reply) < BIG_REPLY)
        if queue:
            self.queues[key] = queue  # to the back: the other streams' turn first

    def _start(self, job: Job) -> None:
        job.bundle = b = self.replies.bundle  # a reload mid-job: the job finishes on the bundle it started on
        job.stream = s = self.replies.streams.get(job.key)
        n = len(job.req.counts)
        job.fresh = bool(job.req.flags & wire.RESET) or not s.n
        job.saved = (s.row.copy(), s.n)
        job.frame = b.writer.frame_for(n, job.req.seq, job.req.t_client_ns, job.fresh)
        job.views = [(name, v) for name, v in b.layout.sections(job.frame, n).items() if v is not None]

    def _slice(self, job: Job):
        """Decode the job's next slice into its reply; the finished reply, or None."""
        if job.bundle is None:
            self._start(job)
        counts = job.req.counts
        n, a = len(counts), job.done
        b = min(n, a + self.slice_bins(job.bundle.limits.max_bins))
        t0 = _clock()
        out = job.bundle.engine.decode_stream(job.stream, counts[a:b] if b - a > 1 else counts[a],
                                             a == 0 and bool(job.req.flags & wire.RESET))
        for name, view in job.views:
            view[a:b] = getattr(out, name)
        took = _clock() - t0
        if took > self.slice_max:
            self.slice_max = took
        job.work += took
        job.done = b
        self.slices += 1
        if b - a >= MIN_SLICE_BINS:
            per_bin = took / (b - a)
            self.ns_per_bin = per_bin if not self.ns_per_bin else 0.8 * self.ns_per_bin + 0.2 * per_bin
        if b < n:
            return None
        server_ns = _clock() - job.t_read
        queue_ns = max(0, server_ns - job.work)
        rec = self.recorder
        if n == 1:
            rec.decoded(server_ns, queue_ns)
        else:
            rec.multi_bin(n)
        return wire.finish(job.frame, server_ns, queue_ns)

    def _failed(self, job: Job, e: Exception):
        if job.bundle is not None:  # put the stream back as it was before the job
            job.stream.row[:], job.stream.n = job.saved
        where = f" (bins counted from bin {job.done} of the request)" if job.done else ""
        return self.replies.engine_error(e, job.req.seq, job.req.t_client_ns, where)


class ControlLane:
    """Requests that are not decodes (INFO, STATS, PING, and frames refused with an ERROR):
    answered ``PER_TURN`` per turn of the loop, after what the turn read, so that a flood of
    them (or of garbage) costs a one-bin request at most that many replies' time. Bounded:
    beyond ``MAX_ITEMS`` or ``MAX_BYTES`` held, a request is dropped unanswered (counted,
    ``dropped.backlog``). Their ``queue_ns`` is the time they waited here."""
    PER_TURN, MAX_ITEMS, MAX_BYTES = 8, 4096, 16 << 20

    def __init__(self, replies: Replies, recorder: Recorder):
        self.replies, self.recorder, self.items, self.bytes = replies, recorder, deque(), 0

    def add(self, src, frames: list, frame, key: bytes, t_read: int) -> None:
        """Queue a request (``frame`` None: its envelope was refused), or drop it when full."""
        size = 0 if frame is None else len(frame)
        if len(self.items) >= self.MAX_ITEMS or self.bytes + size > self.MAX_BYTES:
            self.recorder.drops.backlog += 1
            return
        self.items.append((src, frames, frame, key, t_read, size))
        self.bytes += size

    def step(self) -> None:
        replies, items = self.replies, self.items
        for _ in range(min(self.PER_TURN, len(items))):
            src, frames, frame, key, t_read, size = items.popleft()
            self.bytes -= size
            if frame is None:
                reply = replies.error(ErrorCode.BAD_ENVELOPE, src.envelope_error(frames))
            else:
                reply = replies.answer(frame, key, t_read, _clock())
            if reply is not None:
                src.answer(frames, reply)
