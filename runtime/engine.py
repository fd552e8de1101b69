"""The embeddable decoder: load a bundle, decode bins with ONNX Runtime. Never imports torch.

    dec = BundleDecoder("bundles/chewie")           # checks every file's sha256 first
    out = dec.decode(counts, reset=True)            # a trial's first bin: (n_channels,) raw counts
    out = dec.decode(counts)                        # the next bins of the same stream
    out.angle[0], out.direction[0], out.velocity[0], out.rates[0]

The readout sees a causal window of the stream's last ``history_bins`` latents
(runtime/history.py): ``decode`` keeps this decoder's own stream (a rig's one stream,
in-process), ``reset=True`` starts a new trial. A server holding many streams passes each
stream's ``StreamHistory`` to ``decode_stream``, or one bin of each of several streams to
``decode_streams`` (one batched call). A batch ``(B, n_channels)`` given to ``decode`` or
``decode_stream`` is B consecutive bins of that stream.

One bin costs one ORT call of the fused ``decode.onnx`` graph (BatchNorm and preprocessing
folded into its Gemms at export; the window and the input checks, count min and sum, are part
of the same call) plus the atan2 of two floats for the angle. Batch-1 decodes run through an
IOBinding on preallocated input/output buffers, so the hot path allocates nothing: the
``DecodeOutput`` returned for a single bin is the same object, holding views of those
buffers, every call; it stays valid until the next single-bin decode. Copy it
(``out.copy()``) to keep it. Batched decodes return fresh arrays. A decoder is not
thread-safe: use one per thread. A bundle without a readout (trained without labels) gives
None for angle, direction, proba and velocity.

Session settings are chosen for batch-1 latency on a shared CPU (benchmarks/engine_latency.py
measures them): one intra-op thread, so ORT runs the graph on the calling thread and there
is no pool to wake (``spin`` only matters with more threads: a spinning pool burns a core
the rig's other software may need, so it is off unless asked); sequential execution; all
graph optimizations. After the process has slept for a millisecond or more, a call is
several times slower (caches gone cold); ``warm()`` lets a server pay that before the bin.
"""
from __future__ import annotations

import copy
import json
from math import atan2
from pathlib import Path

import numpy as np
import onnxruntime as ort

from swapvae.runtime.bundle import BundleError, load_bundle
from swapvae.runtime.history import StreamHistory, causal_windows
from swapvae.runtime.output import DecodeOutput
from swapvae.schemas.manifest import CORE_KEY, graph_io, without_retired

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
_INF = float("inf")




def session_options(intra_op_threads: int = 1, spin: bool = False) -> ort.SessionOptions:
    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    o = ort.SessionOptions()
    o.intra_op_num_threads = intra_op_threads
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    o.add_session_config_entry("session.inter_op.allow_spinning", "0")
    o.log_severity_level = 3
    return o


def onnxruntime_advice() -> str:
    """What to install for the CUDA provider, given the ONNX Runtime distributions installed:
    onnxruntime and onnxruntime-gpu share one module, and with both the CPU build may win."""
    from importlib import metadata

    installed = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            installed.append(name)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        return ("onnxruntime and onnxruntime-gpu are both installed and share one module: "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    return "pip install 'swapvae-bci[gpu]' (in place of [cpu]: it brings onnxruntime-gpu alone)"


class BundleDecoder:
    """Decode raw spike counts with an exported bundle, in-process (see the module doc)."""

    def __init__(self, bundle_dir: str | Path, provider: str = "cpu", intra_op_threads: int = 1, spin: bool = False,
                 trusted: list | None = None):
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if provider == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError(f"provider 'cuda' needs onnxruntime-gpu; this onnxruntime has "
                             f"{ort.get_available_providers()}. {onnxruntime_advice()}")
        self.bundle_dir = Path(bundle_dir)
        self.manifest, blobs = load_bundle(self.bundle_dir, trusted)  # trusted: public keys, see runtime/bundle.py
        m = self.manifest
        self.n_channels, self.provider = m.n_channels, provider
        self.history_bins, self.latent_dim = m.history_bins, m.latent_dim
        self.has_readout = m.readout is not None
        try:
            self.session = ort.InferenceSession(blobs[m.graphs["decode"].file], session_options(intra_op_threads, spin),
                                                providers=PROVIDERS[provider])
        except Exception as e:  # ORT's own exception classes: say which bundle
            raise BundleError(f"{self.bundle_dir}: onnxruntime {ort.__version__} cannot load the decode graph: "
                              f"{e}") from None
        self._inputs, self._outputs = graph_io(m.readout)["decode"]
        widths = {"latent": m.latent_dim, "resultant": 2, "direction": None, "proba": m.n_classes, "velocity": 2,
                  "rates": m.n_neurons, "count_min": None, "count_sum": None}
        widths = {k: widths[k] for k in self._outputs}
        self._check_graph_io(widths)
        self._check_graph_metadata()
        self._k = m.content_dim
        self._bind_one(widths)
        # warm() runs decode_stream itself (the same Python and numpy code as a real bin, which go
        # cold too) on a copy of this decoder bound to scratch buffers and a scratch stream,
        # leaving the last decode's outputs and every client's stream alone.
        self._warmer = copy.copy(self)
        self._warmer._bind_one(widths)
        self._warm_stream, self._warm_x = self.new_stream(), np.zeros(self.n_channels, np.float32)
        self.stream = self.new_stream()  # this decoder's own stream (in-process use)
        for _ in range(3):  # first runs allocate and plan; keep that off the first real bin
            self.warm()
        self.decode_stream(self.new_stream(), np.zeros((2, self.n_channels), np.float32))

    def _bind_one(self, widths: dict) -> None:
        """The batch-1 fast path: buffers bound once; a decode copies the bin (and the stream's
        history) in, runs, and reads a few scalars back through memoryviews (cheaper than numpy
        calls on tiny arrays)."""
        x = {"counts": np.zeros((1, self.n_channels), np.float32)}
        if "history" in self._inputs:
            x.update(history=np.zeros((1, (self.history_bins - 1) * self.latent_dim), np.float32),
                     first=np.zeros((1, 1), bool))
        self._x1 = x["counts"]
        self._x1_mv = memoryview(self._x1[0])
        self._hist1 = x.get("history")
        self._first1 = x.get("first")
        y = {k: np.zeros((1, w) if w is not None else (1,), np.int64 if k == "direction" else np.float32)
             for k, w in widths.items()}
        self._run, self._bound, self._io = _bound_runner(self.session, x, y)
        self._latent1 = y["latent"]
        angle = np.zeros(1, np.float32) if self.has_readout else None
        self._out1 = DecodeOutput(content=y["latent"][:, :self._k], style_mean=y["latent"][:, self._k:], angle=angle,
                                  direction=y.get("direction"), proba=y.get("proba"), velocity=y.get("velocity"),
                                  rates=y["rates"])
        if self.has_readout:
            self._angle_mv, self._res_mv = memoryview(angle), memoryview(y["resultant"].reshape(-1))
        self._min_mv, self._sum_mv = memoryview(y["count_min"]), memoryview(y["count_sum"])

    def new_stream(self) -> StreamHistory:
        """An empty history for one more stream (a server's client)."""
        return StreamHistory(self.history_bins, self.latent_dim)

    def reset(self) -> None:
        """Start a new trial on this decoder's own stream."""
        self.stream.reset()

    def warm(self) -> None:
        """Decode a zero bin on a scratch stream without touching the last decode's outputs.
        After the process sleeps for a millisecond or more, the next decode is several times
        slower (ORT's code and weights, and the Python and numpy code around the call, left
        the caches); a server can call this while idle, shortly before the next bin is due,
        so the real bin finds them warm. Measured in benchmarks/engine_latency.py."""
        self._warmer.decode_stream(self._warm_stream, self._warm_x)

    def _check_graph_metadata(self) -> None:
        raw = self.session.get_modelmeta().custom_metadata_map.get(CORE_KEY)
        try:
            built = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            built = None
        if not isinstance(built, dict):
            raise BundleError(f"{self.bundle_dir}: the decode graph carries no readable {CORE_KEY} metadata")
        core = self.manifest.core()
        try:
            built = without_retired(built, f"{self.bundle_dir}: the decode graph")
        except ValueError as e:
            raise BundleError(str(e)) from None
        differ = sorted(k for k in core.keys() | built.keys() if core.get(k) != built.get(k))
        if differ:
            raise BundleError(f"{self.bundle_dir}: the decode graph does not match the manifest: {differ} "
                              f"differ from the values it was exported with")

    def _check_graph_io(self, widths: dict[str, int | None]) -> None:
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        problem = None
        if [i.name for i in ins] != list(self._inputs) or ins[0].shape[1:] != [self.n_channels]:
            problem = (f"inputs {[(i.name, i.shape) for i in ins]}, expected {self._inputs} "
                       f"(counts of {self.n_channels})")
        elif [o.name for o in outs] != list(self._outputs):
            problem = f"outputs {[o.name for o in outs]}, expected {self._outputs}"
        else:
            for o in outs:
                want = [widths[o.name]] if widths[o.name] is not None else []
                if o.shape[1:] != want:
                    problem = f"output {o.name} has shape {o.shape}, the manifest implies (batch, *{want})"
        if problem:
            raise BundleError(f"{self.bundle_dir}: the decode graph does not match the manifest: {problem}")

    # -- decoding ---------------------------------------------------------------------------------
    def decode(self, counts: np.ndarray, reset: bool = False) -> DecodeOutput:
        """Decode raw counts of all ``n_channels`` channels on this decoder's own stream: one bin
        ``(n_channels,)`` or consecutive bins ``(B, n_channels)``, any real dtype (float32 is
        fastest); ``reset`` first (a trial start). Raises ValueError naming the problem on a
        wrong shape or dtype, or values that are NaN, infinite or negative (the stream is then
        left as it was). For one bin, the result's arrays are reused by the next single-bin call."""
        return self.decode_stream(self.stream, counts, reset)

    def decode_stream(self, stream: StreamHistory, counts: np.ndarray, reset: bool = False) -> DecodeOutput:
        """``decode`` on the given stream's history (``new_stream()``), which it advances."""
        try:
            self._x1_mv[:] = counts  # one memcpy when counts is a float32 (n_channels,) array
        except (TypeError, ValueError):
            x = np.asarray(counts)
            if x.dtype.kind not in "fiu":
                raise ValueError(f"counts must be a real numeric array, got dtype {x.dtype}") from None
            if x.shape not in ((self.n_channels,), (1, self.n_channels)):
                return self._decode_sequence(stream, self._batch(x), reset)
            with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
                np.copyto(self._x1, x.reshape(self._x1.shape), casting="unsafe")
        if self._hist1 is not None:
            self._hist1[0] = stream.row
            self._first1[0, 0] = reset or stream.fresh
        self._run(self._bound, None)
        if not (self._min_mv[0] >= 0.0 and self._sum_mv[0] < _INF):  # also False for NaN
            check_counts(self._x1)
        if reset:  # only now: a refused bin leaves the stream as it was
            stream.reset()
        stream.push(self._latent1[0])
        if self.has_readout:
            self._angle_mv[0] = atan2(self._res_mv[1], self._res_mv[0])
        return self._out1

    def decode_streams(self, streams: list[StreamHistory], counts: np.ndarray, resets=None) -> DecodeOutput:
        """One bin of each of several distinct streams ``(B, n_channels)`` in one call (fresh
        arrays); ``resets``: which streams start a trial with this bin."""
        x = self._batch(np.asarray(counts))
        if len(streams) != len(x) or len({id(s) for s in streams}) != len(streams):
            raise ValueError(f"decode_streams takes one bin of each of {len(x)} distinct streams, got {len(streams)}")
        feed = {"counts": x}
        if self._hist1 is not None:
            resets = np.zeros(len(x), bool) if resets is None else np.asarray(resets, bool)
            feed["history"] = np.stack([s.row for s in streams])
            feed["first"] = (resets | np.array([s.fresh for s in streams]))[:, None]
        out = self._run_checked(feed)  # refused bins raise before any stream moves
        for i, s in enumerate(streams):
            if resets is not None and resets[i]:
                s.reset()
            s.push(out["latent"][i])
        return self._output(out)

    def _batch(self, x: np.ndarray) -> np.ndarray:
        if x.dtype.kind not in "fiu":
            raise ValueError(f"counts must be a real numeric array, got dtype {x.dtype}")
        if x.ndim != 2 or x.shape[1] != self.n_channels:
            raise ValueError(f"counts must have shape ({self.n_channels},) or (B, {self.n_channels}) "
                             f"(one value per recorded channel), got {x.shape}")
        if x.shape[0] == 0:
            raise ValueError("counts is an empty batch (0 bins)")
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(x, dtype=np.float32)

    def _run_checked(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(zip(self._outputs, self.session.run(None, feed)))
        if not ((out["count_min"] >= 0).all() and (out["count_sum"] < _INF).all()):
            check_counts(feed["counts"])
        return out

    def _decode_sequence(self, stream: StreamHistory, x: np.ndarray, reset: bool) -> DecodeOutput:
        """Consecutive bins of one stream: the latents first, then the readout on the windows
        they make with the stream's history (the same graph, so the same numbers as bin by bin)."""
        if self._hist1 is None:
            out = self._run_checked({"counts": x})
        else:
            n, d, k = len(x), self.latent_dim, self.history_bins
            latent = self._run_checked({"counts": x, "history": np.zeros((n, (k - 1) * d), np.float32),
                                        "first": np.ones((n, 1), bool)})["latent"]
            fresh = reset or stream.fresh
            past = np.repeat(latent[:1], k - 1, axis=0) if fresh else stream.row.reshape(k - 1, d)[::-1]
            seq = np.concatenate([past, latent])  # oldest first: bin t of x is row t + k - 1
            history = causal_windows(seq, np.zeros(len(seq)), k)[k - 1:, d:]  # lags 1..k-1 of each bin
            first = np.zeros((n, 1), bool)
            out = self._run_checked({"counts": x, "history": history, "first": first})
        if reset:
            stream.reset()
        for z in out["latent"]:
            stream.push(z)
        return self._output(out)

    def _output(self, out: dict[str, np.ndarray]) -> DecodeOutput:
        angle = None
        if self.has_readout:  # as the one-bin path: atan2 in double precision, then float32
            r = out["resultant"].astype(np.float64)
            angle = np.arctan2(r[:, 1], r[:, 0]).astype(np.float32)
        latent = out["latent"]
        return DecodeOutput(content=latent[:, :self._k], style_mean=latent[:, self._k:], angle=angle,
                            direction=out.get("direction"), proba=out.get("proba"), velocity=out.get("velocity"),
                            rates=out["rates"])


def _bound_runner(session: ort.InferenceSession, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
    """An IOBinding of fixed CPU buffers as ``(run, arg, io)``: ``run(arg, None)`` is one
    inference. The binding holds raw pointers to the buffers: keep ``io`` (which references
    them) as long as ``run`` may be called."""
    io = session.io_binding()
    for k, buf in inputs.items():
        io.bind_input(k, "cpu", 0, buf.dtype.type, buf.shape, buf.ctypes.data)
    for k, buf in outputs.items():
        io.bind_output(k, "cpu", 0, buf.dtype.type, buf.shape, buf.ctypes.data)
    io._swapvae_buffers = (inputs, outputs)  # the binding holds raw pointers: keep the arrays alive with it
    try:  # the public run_with_iobinding re-checks WebGPU graph-capture state on every call
        run, arg = session._sess.run_with_iobinding, io._iobinding
        run(arg, None)
        return run, arg, io
    except (AttributeError, TypeError):
        return session.run_with_iobinding, io, io


def check_counts(x: np.ndarray, name: str = "counts") -> None:
    """Raise ValueError naming the first NaN, infinite or negative value of ``x`` (2-D)."""
    for what, mask in (("NaN", np.isnan(x)), ("infinite (or beyond float32)", np.isinf(x)), ("negative", x < 0)):
        if mask.any():
            b, c = np.argwhere(mask)[0]
            where = f"channel {c}" if len(x) == 1 else f"bin {b}, channel {c}"
            raise ValueError(f"{name} must be finite and >= 0: {int(mask.sum())} {what} value(s), "
                             f"first at {where} ({x[b, c]})")
    raise ValueError(f"{name} sum beyond float32 range: these are not spike counts")
