"""What the benchmarks share: the Chewie-1 path, the machine they ran on, where results go, a
default-size model exported to a bundle, and that model decoded by torch eagerly (the naive alternative
the runtime is measured against)."""
from __future__ import annotations

import json
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks run as scripts from anywhere
# The shared data lie beside the checkout (or a level further up, for a worktree): the nearest one up.
CHEWIE = next((p / "shared/data/reaching/chewie-2013-10-03.npz" for p in ROOT.parents
               if (p / "shared/data/reaching/chewie-2013-10-03.npz").exists()),
              ROOT.parent / "shared/data/reaching/chewie-2013-10-03.npz")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_result(path: str | Path, result: dict) -> Path:
    """Write a benchmark's JSON result (its folder made as needed) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written to {out}")
    return out


def build_bundle(workdir: Path, d: int = 174, weights: str = "fp32") -> tuple[Path, Path]:
    """A default-config model for ``d`` channels (Chewie-1 for 174, a simulated session
    otherwise), trained two epochs (latency does not depend on how well) and exported. Kept in
    ``workdir``: a later run reuses the run directory, and the bundle if it still loads."""
    import torch

    from swapvae.runtime.engine import BundleDecoder
    from swapvae.schemas.config import SwapVAEConfig
    from swapvae.schemas.session import write_npz
    from swapvae.training.export import export_bundle
    from swapvae.training.run import train_run

    run, bundle = workdir / f"run{d}", workdir / (f"bundle{d}" if weights == "fp32" else f"bundle{d}_{weights}")
    if (bundle / "manifest.json").exists():
        try:
            BundleDecoder(bundle)
            return run, bundle
        except ValueError:  # written by an older export: export again
            shutil.rmtree(bundle)
    if not (run / "checkpoint.pt").exists():
        torch.set_num_threads(1)
        if d == 174 and CHEWIE.exists():
            data = str(CHEWIE)
        else:
            from swapvae.training.simulate import simulate_reaching

            data = str(write_npz(simulate_reaching(n_neurons=d, seed=0), workdir / f"simulated{d}.npz"))
        cfg = SwapVAEConfig.model_validate({"device": "cpu", "optim": {"epochs": 2},
                                            "readout": {"C_grid": [0.1], "cv_folds": 2}})
        train_run(data, run, cfg, progress=False)
    export_bundle(run, bundle, weights=weights)
    return run, bundle


class TorchEngine:
    """The engine interface (``n_channels``, ``manifest``, ``history_bins``, ``latent_dim``,
    ``new_stream``, ``decode_stream``, ``decode_streams``) on the torch model, eager, one
    intra-op thread, BatchNorm unfolded, with the numpy readout on each stream's window."""

    def __init__(self, run_dir: str | Path):
        import torch

        from swapvae.training.rundir import RunDir

        torch.set_num_threads(1)  # one core like the runtime; also faster than a pool at batch 1
        self.torch = torch
        run = RunDir(run_dir)
        self.est, self.readout = run.estimator(), run.readout()
        self.n_channels = self.est.n_features_in_
        m = self.est.config_.model
        self.latent_dim, self.history_bins = m.content_dim + m.style_dim, self.readout.history_bins
        self.manifest = _JsonModel({"engine": "torch eager", "run": str(run_dir)})
        self.stream = self.new_stream()

    def new_stream(self):
        from swapvae.runtime.history import StreamHistory

        return StreamHistory(self.history_bins, self.latent_dim)

    def decode(self, counts, reset: bool = False):
        return self.decode_stream(self.stream, counts, reset)

    def _latents(self, counts):
        x = np.asarray(counts, np.float32).reshape(-1, self.n_channels)
        if not (np.isfinite(x).all() and (x >= 0).all()):
            raise ValueError("counts must be finite and >= 0")
        with self.torch.inference_mode():
            model = self.est.model_
            c, mu, _ = model.encoder(self.torch.from_numpy(x[:, self.est.neurons_] * self.est.input_scale))
            rates = model.decoder(self.torch.cat([c, mu], -1))
        return np.concatenate([c.numpy(), mu.numpy()], axis=1), rates.numpy()

    def _window(self, stream, z: np.ndarray, reset: bool) -> np.ndarray:
        if reset:
            stream.reset()
        past = np.tile(z, self.history_bins - 1) if stream.fresh else stream.row
        stream.push(z)
        return np.r_[z, past]

    def _output(self, z: np.ndarray, windows: np.ndarray, rates: np.ndarray):
        from swapvae.runtime.output import DecodeOutput

        proba = self.readout.proba(windows)
        f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
        k = self.est.config.model.content_dim
        return DecodeOutput(content=f32(z[:, :k]), style_mean=f32(z[:, k:]), angle=f32(self.readout.angle(windows)),
                            direction=proba.argmax(1).astype(np.int64), proba=f32(proba),
                            velocity=f32(self.readout.velocity(windows)), rates=f32(rates))

    def decode_stream(self, stream, counts, reset: bool = False):
        z, rates = self._latents(counts)
        windows = np.stack([self._window(stream, zi, reset and i == 0) for i, zi in enumerate(z)])
        return self._output(z, windows, rates)

    def decode_streams(self, streams, counts, resets=None):
        z, rates = self._latents(counts)
        resets = np.zeros(len(z), bool) if resets is None else resets
        windows = np.stack([self._window(s, zi, bool(r)) for s, zi, r in zip(streams, z, resets)])
        return self._output(z, windows, rates)


class _JsonModel:
    def __init__(self, d: dict):
        self.d = d

    def model_dump_json(self) -> str:
        return json.dumps(self.d)
