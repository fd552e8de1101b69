"""Queued one-bin decodes sharing engine calls: the one place the service reorders requests.

When the loop finds one-bin decodes queued behind the one it read, it drains them (up to
``MAX_BATCH``, while they are fast-path decodes: runtime/serve/server.py) and hands them here
in arrival order. Each round takes the request at the head of every stream: their bins in one
engine call, one bin per stream (far cheaper per bin than one call each, which is what lets
one core keep up with a burst), or, when they come from one stream alone, that stream's run
of queued bins in one call. Replies equal lone one-bin decodes up to float rounding, and a
stream's requests keep their arrival order. A batch whose engine call fails (one NaN bin) is
answered request by request, so only the bad one errs.
"""
from __future__ import annotations

import time

import numpy as np

from swapvae.runtime import wire
from swapvae.runtime.serve.recorder import Recorder
from swapvae.runtime.serve.replies import Replies

MAX_BATCH = 32  # queued requests taken at once; their one-bin decodes share engine calls
_RESET = wire.RESET
_clock = time.perf_counter_ns


class Coalescer:
    """Serves a batch of fast-path decodes through ``replies`` (its bundle, streams and
    recorder), answering each on its source (see the module doc)."""

    def __init__(self, replies: Replies, recorder: Recorder):
        self.replies, self.recorder = replies, recorder

    def serve(self, src, batch: list) -> None:
        """Answer every request of ``batch`` ([(frames, t_read, key, frame, head)], in arrival
        order) on ``src``, in rounds of stream heads."""
        by_stream: dict[bytes, list] = {}
        for req in batch:
            by_stream.setdefault(req[2], []).append(req)
        queues = list(by_stream.values())
        while len(queues) > 1:  # rounds: the head of every stream in one call
            self._decode(src, [q[0] for q in queues], False)
            queues = [q[1:] for q in queues if len(q) > 1]
        if queues:  # one stream left: its runs of bins, each up to the next RESET, in one call each
            q, i = queues[0], 0
            while i < len(q):
                run = 1
                while i + run < len(q) and not q[i + run][4][2] & _RESET:
                    run += 1
                self._decode(src, q[i:i + run], True)
                i += run

    def _decode(self, src, rows: list, run: bool) -> None:
        """One engine call for ``rows``: one bin of each of several streams, or (``run``)
        consecutive bins of one stream. A single row is answered alone."""
        replies = self.replies
        if len(rows) == 1:
            frames, t_read, key, frame, head = rows[0]
            src.answer(frames, replies.decode_one(frame, head, key, t_read, _clock()))
            return
        b = replies.bundle
        one_bin = b.one_bin
        for row in rows:
            one_bin.add(row[3])
        counts, seqs, t_clients, flags = one_bin.batch()
        t_read = np.array([row[1] for row in rows], np.int64)
        try:
            if run:
                stream = replies.streams.get(rows[0][2])
                reset = flags[0] & _RESET
                fresh = np.zeros(len(rows), bool)
                fresh[0] = reset or not stream.n
                t_start = _clock()
                out = b.engine.decode_stream(stream, counts, reset)
            else:
                streams = [replies.streams.get(row[2]) for row in rows]
                resets = (flags & _RESET).astype(bool)
                fresh = resets | np.array([not s.n for s in streams])
                t_start = _clock()
                out = b.engine.decode_streams(streams, counts, resets)
        except Exception:  # noqa: BLE001 - e.g. one NaN bin: answer each alone, in order, so only it errs
            one_bin.clear()
            for frames, t, key, frame, head in rows:
                src.answer(frames, replies.decode_one(frame, head, key, t, _clock()))
            return
        server_ns = _clock() - t_read
        queue_ns = t_start - t_read
        self.recorder.decoded_together(server_ns, queue_ns)
        out_rows = b.writer.write_rows(seqs, t_clients, server_ns, queue_ns, fresh, out)
        one_bin.clear()
        size = b.writer.frame_bytes
        for i, row in enumerate(rows):
            src.answer(row[0], out_rows[i * size:(i + 1) * size])  # sent with copy: the buffer is reused
