"""What the benchmarks share: the Chewie-1 path, the machine they ran on, a default-size
model exported to a bundle, and that model decoded by torch eagerly (the naive alternative
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
CHEWIE = (ROOT / "../shared/data/reaching/chewie-2013-10-03.npz").resolve()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_bundle(workdir: Path, d: int = 174, weights: str = "fp32") -> tuple[Path, Path]:
    """A default-config model for ``d`` channels (Chewie-1 for 174, a simulated session
    otherwise), trained two epochs (latency does not depend on how well) and exported. Kept in
    ``workdir``: a later run reuses the run directory, and the bundle if it still loads."""
    import torch

    from runtime.engine import BundleDecoder
    from schemas.config import SwapVAEConfig
    from schemas.session import write_npz
    from training.export import export_bundle
    from training.run import train_run

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
            from training.simulate import simulate_reaching

            data = str(write_npz(simulate_reaching(n_neurons=d, seed=0), workdir / f"simulated{d}.npz"))
        cfg = SwapVAEConfig.model_validate({"device": "cpu", "optim": {"epochs": 2},
                                            "readout": {"C_grid": [0.1], "cv_folds": 2}})
        train_run(data, run, cfg, progress=False)
    export_bundle(run, bundle, weights=weights)
    return run, bundle


class TorchEngine:
    """The engine interface (``n_channels``, ``manifest``, ``decode``) on the torch model,
    eager, one intra-op thread, BatchNorm unfolded, with the numpy readout."""

    def __init__(self, run_dir: str | Path):
        import torch

        from training.rundir import RunDir

        torch.set_num_threads(1)  # one core like the runtime; also faster than a pool at batch 1
        self.torch = torch
        run = RunDir(run_dir)
        self.est, self.readout = run.estimator(), run.readout()
        self.n_channels = self.est.n_features_in_
        self.manifest = _JsonModel({"engine": "torch eager", "run": str(run_dir)})

    def decode(self, counts):
        from runtime.engine import DecodeOutput

        x = np.asarray(counts, np.float32).reshape(-1, self.n_channels)
        if not (np.isfinite(x).all() and (x >= 0).all()):
            raise ValueError("counts must be finite and >= 0")
        with self.torch.inference_mode():
            model = self.est.model_
            c, mu, _ = model.encoder(self.torch.from_numpy(x[:, self.est.neurons_] * self.est.input_scale))
            rates = model.decoder(self.torch.cat([c, mu], -1))
        z = np.concatenate([c.numpy(), mu.numpy()], axis=1)
        proba = self.readout.proba(z)
        f32 = lambda a: np.ascontiguousarray(a, np.float32)  # noqa: E731
        return DecodeOutput(f32(c.numpy()), f32(mu.numpy()), f32(self.readout.angle(z)),
                            proba.argmax(1).astype(np.int64), f32(proba), f32(rates.numpy()))


class _JsonModel:
    def __init__(self, d: dict):
        self.d = d

    def model_dump_json(self) -> str:
        return json.dumps(self.d)
