"""The ZeroMQ decoding service (``swapvae serve``), beside the embeddable engine it serves.

    server.py      the loop: sockets, waiting, reading and classifying each message, reload
    replies.py     the one place a request's reply is computed (decodes, controls, errors)
    coalescing.py  queued one-bin decodes of several streams sharing engine calls
    lanes.py       multi-bin decodes in slices, control requests a few per turn
    serving.py     a bundle made ready to serve (``ServingBundle``)
    sources.py     where messages come from and replies go (ROUTER, SUB/XPUB, CURVE's ZAP)
    waits.py       blocking or spinning waits; prewarm.py, warm-ups before a steady stream's bin
    limits.py      byte limits and control rates; recorder.py, what STATS reports
    service.py     the process around the server (keys, limits, signals, the ready line)
    admin.py       operators' tools: verify a bundle as the server loads it, read STATS

Nothing here imports torch, scikit-learn or onnx; the engine (``swapvae.runtime.engine``),
the wire format (``swapvae.runtime.wire``) and the keys (``swapvae.runtime.security``) are
shared with in-process users and clients.
"""
