"""Serving a drained queue: the requests the loop found waiting behind the one it read, taken up
to ``MAX_BATCH`` at once while they are one-bin decodes, their one-bin decodes sharing engine
calls. A part of ``Server``
(runtime/server.py), kept apart because it is the one place that reorders requests.

Each round takes the request at the head of every stream: the one-bin decodes among them in
one engine call, one bin per stream (far cheaper per bin than one call each, which is what
lets one core keep up with a burst), or, when they come from one stream alone, that stream's
run of queued one-bin decodes in one call; then the other heads one by one. Replies equal lone
one-bin decodes up to float rounding, and a stream's requests keep their arrival order.

Multi-bin decodes (and every later decode of their stream) go to the multi-bin lane
(runtime/lanes.py) as they are read, in arrival order: the rounds here run before the lane's
next slice, so the stream's earlier bins are decoded first. Requests that are not decodes go
to the later lane, answered a few per turn after the decodes.
"""
from __future__ import annotations

import time

import numpy as np
import zmq

from swapvae.runtime import wire
from swapvae.runtime.sources import STREAM_KEY, Refused

MAX_BATCH = 32  # queued requests taken at once; their one-bin decodes share engine calls
_NOBLOCK = int(zmq.NOBLOCK)
_RESET = wire.RESET
_clock = time.perf_counter_ns


def _size(frames: list) -> int:
    return 0 if frames[-1].__class__ is Refused else len(frames[-1])


class Coalescing:
    """The queue-draining half of ``Server``: needs its ``_answer``, ``_route``, ``model``,
    ``lane``, ``streams`` and ``recorder``."""

    def _serve_queue(self, src, first: list, t_first: int) -> None:
        """Serve ``first`` and the requests queued behind it, up to MAX_BATCH, in rounds (see
        the module doc)."""
        recv, queued, fast = src.recv, [(first, t_first)], self.model.one_bin.size
        # Drained only while they are one-bin decodes, which coalesce: a control request, an
        # error or a bulk one ends the drain, so a one-bin request read before it is decoded
        # without waiting for more reads (a flood of those is read a turn at a time).
        more = _size(first) == fast
        while more and len(queued) < MAX_BATCH:
            try:
                frames = recv(_NOBLOCK)
            except zmq.Again:
                break
            queued.append((frames, _clock()))
            more = _size(frames) == fast
        match, keyed, lane = self.model.one_bin.match, src.keyed, self.lane.queues
        by_stream: dict[bytes, list] = {}  # key -> [(frames, t_read, frame, one-bin head or None)], in order
        for frames, t in queued:
            frame = src.request(frames)
            key = frames[0] if keyed else STREAM_KEY
            if (frame is None or key in lane or len(frame) != fast) and self._route(src, frames, frame, key, t):
                continue  # to a lane (a stream with multi-bin work there stays the lane's from here on)
            head = match(frame) if frame is not None else None
            by_stream.setdefault(key, []).append((frames, t, frame, head))
        pending = [(key, q, 0) for key, q in by_stream.items()]  # (key, queue, index of its head)
        while pending:
            fast = [(key, q[i]) for key, q, i in pending if q[i][3] is not None]
            taken = {key: 1 for key, _ in fast}
            if len(fast) == 1 and len(pending) == 1:  # one stream alone: its run of one-bin decodes
                key, q, i = pending[0]
                run = 1
                while i + run < len(q) and q[i + run][3] is not None and not q[i + run][3][2] & _RESET:
                    run += 1
                self._decode_batch(src, [(key, m) for m in q[i:i + run]], run > 1)
                taken[key] = run
            elif fast:
                self._decode_batch(src, fast, False)
            for key, q, i in pending:
                if key not in taken:
                    frames, t_read = q[i][:2]
                    self._answer(src, frames, t_read, _clock(), route=False)
            pending = [(key, q, i + taken.get(key, 1)) for key, q, i in pending if i + taken.get(key, 1) < len(q)]

    def _decode_batch(self, src, rows: list, run: bool) -> None:
        """One engine call for the one-bin requests ``rows`` ([(key, (frames, t_read, frame,
        head))]): one bin of each of several streams, or (``run``) consecutive bins of one
        stream. A single row is served alone."""
        if len(rows) == 1:
            frames, t_read = rows[0][1][:2]
            self._answer(src, frames, t_read, _clock(), route=False)
            return
        m = self.model
        one_bin = m.one_bin
        for _, (_, _, frame, _) in rows:
            one_bin.add(frame)
        counts, seqs, t_clients, flags = one_bin.batch()
        t_read = np.array([r[1] for _, r in rows], np.int64)
        try:
            if run:
                stream = self.streams.get(rows[0][0])
                reset = flags[0] & _RESET
                fresh = np.zeros(len(rows), bool)
                fresh[0] = reset or not stream.n
                t_start = _clock()
                out = m.engine.decode_stream(stream, counts, reset)
            else:
                streams = [self.streams.get(key) for key, _ in rows]
                resets = (flags & _RESET).astype(bool)
                fresh = resets | np.array([not s.n for s in streams])
                t_start = _clock()
                out = m.engine.decode_streams(streams, counts, resets)
        except Exception:  # noqa: BLE001 - e.g. one NaN bin: answer each alone, in order, so only it errs
            one_bin.clear()
            for _, (frames, t, _, _) in rows:
                self._answer(src, frames, t, _clock(), route=False)
            return
        server_ns = _clock() - t_read
        queue_ns = t_start - t_read
        self.recorder.requests += len(rows)
        self.recorder.decoded_together(server_ns, queue_ns)
        replies = m.writer.write_rows(seqs, t_clients, server_ns, queue_ns, fresh, out)
        one_bin.clear()
        size = m.writer.frame_bytes
        for i, (_, (frames, _, _, _)) in enumerate(rows):
            src.answer(frames, replies[i * size:(i + 1) * size])  # sent with copy: the buffer is reused
