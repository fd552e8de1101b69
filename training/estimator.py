"""A scikit-learn style estimator around the Swap-VAE model: ``fit`` on training bins,
``transform`` to the frozen representation, ``save``/``load`` a checkpoint file.

The estimator owns the preprocessing that inference must repeat: which recording channels
are kept (static-neuron filter, fitted on training bins) and the input unit (counts or Hz).
Inputs to every method are raw count vectors over all recorded channels.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from schemas import SwapVAEConfig
from schemas.session import static_filter
from training.data import jitter_pairs
from training.model import SwapVAE

SPACES = ("full", "content", "style")


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint (if any) is left in place."""


def resolve_device(name: str) -> torch.device:
    """The torch device of a config's ``device``: "auto" (CUDA when torch sees it), "cpu",
    "cuda" (the current GPU) or "cuda:N"; RuntimeError naming what torch sees otherwise."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for but torch sees no CUDA device")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} was asked for but torch sees {torch.cuda.device_count()} CUDA "
                               f"device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


class SwapVAEEstimator:
    def __init__(self, config: SwapVAEConfig | None = None, **overrides):
        config = config or SwapVAEConfig()
        self.config = config.with_overrides(**overrides) if overrides else config
        self.model_: SwapVAE | None = None
        self.neurons_: np.ndarray | None = None
        self.n_channels_: int | None = None
        self.bin_size_s_: float = 0.1
        self.history_: list[dict[str, float]] = []
        self.train_seconds_: float = float("nan")

    # -- preprocessing shared by fit and transform -------------------------------------------
    @property
    def input_scale(self) -> float:
        """Multiplier from counts to model input (1, or 1 / bin size for Hz)."""
        return 1.0 / self.bin_size_s_ if self.config.data.input_unit == "hz" else 1.0

    def _inputs(self, counts: np.ndarray, device: torch.device | None = None) -> torch.Tensor:
        self._check_fitted()
        counts = np.asarray(counts)
        if counts.ndim != 2 or counts.shape[1] != self.n_channels_:
            raise ValueError(f"expected counts of shape (bins, {self.n_channels_}), got {counts.shape}")
        x = torch.as_tensor(counts[:, self.neurons_] * self.input_scale, dtype=torch.float32)
        return x.to(device or next(self.model_.parameters()).device)

    def _check_fitted(self) -> None:
        if self.model_ is None:
            raise RuntimeError("this estimator is not fitted yet: call fit() or load()")

    # -- training ------------------------------------------------------------------------------
    def fit(self, counts: np.ndarray, trial: np.ndarray, bin_in_trial: np.ndarray, *,
            neurons: np.ndarray | None = None, bin_size_s: float = 0.1, checkpoint: str | Path | None = None,
            progress: bool = True) -> "SwapVAEEstimator":
        """Train on these bins (raw counts over all channels); with ``checkpoint``, save there
        every ``optim.checkpoint_every`` epochs and at the end."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        device = resolve_device(cfg.device)
        counts = np.asarray(counts, dtype=np.float32)
        if cfg.data.thin_min < 1 and not np.array_equal(counts, np.round(counts)):
            raise ValueError("spike thinning (data.thin_min < 1) needs whole spike counts, and these have "
                             "fractional values: pass counts, or set data.thin_min to 1")
        self.n_channels_, self.bin_size_s_ = counts.shape[1], float(bin_size_s)
        self.neurons_ = np.asarray(neurons) if neurons is not None else static_filter(counts, cfg.data.static_std)
        n_in = len(self.neurons_)
        self.model_ = build_model(cfg, n_in).to(device)
        x = self._inputs(counts, device)
        pairs = torch.as_tensor(jitter_pairs(np.asarray(trial), np.asarray(bin_in_trial), cfg.data.jitter), device=device)
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        # fused: one kernel for all parameters instead of a Python loop of small ops per step
        opt = torch.optim.Adam(self.model_.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                               fused=True)
        steps_per_epoch = max(1, len(x) // cfg.optim.batch_size)
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.history_ = []
        threads = torch.get_num_threads()
        try:
            if device.type == "cpu":
                torch.set_num_threads(cfg.optim.cpu_threads or self._calibrate_threads(x, pairs, threads))
            self._train(x, pairs, gen, opt, steps_per_epoch, checkpoint, progress)
        finally:
            torch.set_num_threads(threads)
        self.model_.eval()
        if checkpoint is not None:
            self.save(checkpoint)
        return self

    def _step(self, model: SwapVAE, opt, x: torch.Tensor, pairs: torch.Tensor, gen: torch.Generator) -> dict:
        """One optimiser step on a batch of in-trial view pairs; returns the loss terms."""
        cfg = self.config
        idx = pairs[torch.randint(len(pairs), (cfg.optim.batch_size,), generator=gen, device=x.device)]
        x1, x2 = x[idx.T.reshape(-1)].chunk(2)  # one gather for both views
        if cfg.data.dropout_max > 0:  # the dropped bin is the view and its target
            x1, x2 = _neuron_dropout(x1, cfg.data.dropout_max, gen), _neuron_dropout(x2, cfg.data.dropout_max, gen)
        targets = None
        if cfg.data.thin_min < 1:  # the encoder sees thinned bins, the decoder reconstructs whole ones
            targets = (x1, x2)
            thin, scale = cfg.data.thin_min, self.input_scale
            x1, x2 = _thin(x1, thin, scale, gen), _thin(x2, thin, scale, gen)
        out = model.loss(x1, x2, cfg.loss.swap, cfg.loss.kl_weight, cfg.loss.align_weight, cfg.loss.eps, targets)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out

    def _calibrate_threads(self, x: torch.Tensor, pairs: torch.Tensor, cores: int) -> int:
        """Training's CPU thread count when ``optim.cpu_threads`` is 0: one per core or one,
        whichever runs a training step faster here and now (one thread wins beside other busy
        processes, whose cores OpenMP's barriers wait for). Timed on a scratch copy of the
        model with its own random draws, so the run itself is exactly the run it would be with
        that thread count fixed: a run is bit-reproducible for a seed at a given thread count,
        and BLAS may sum in a different order at another one."""
        if cores < 2:
            return 1
        scratch = copy.deepcopy(self.model_)
        opt = torch.optim.Adam(scratch.parameters(), lr=self.config.optim.lr, fused=True)
        gen = torch.Generator(device=x.device).manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            return choose_threads(lambda: self._step(scratch, opt, x, pairs, gen), (cores, 1))

    def _train(self, x, pairs, gen, opt, steps_per_epoch, checkpoint, progress) -> None:
        cfg, device = self.config, x.device
        bar = _progress(cfg.optim.epochs, progress)
        terms = ("loss", "rec", "kl", "align")
        start = time.perf_counter()
        self.model_.train()
        for epoch in range(1, cfg.optim.epochs + 1):
            sums = torch.zeros(len(terms), device=device)
            for _ in range(steps_per_epoch):
                out = self._step(self.model_, opt, x, pairs, gen)
                sums += torch.stack([out[k].detach() for k in terms])
            epoch_terms = dict(zip(terms, (sums / steps_per_epoch).tolist()))
            if not all(math.isfinite(v) for v in epoch_terms.values()):
                # The epoch's weights are suspect; the checkpoint on disk is from a finite epoch.
                saved = (f"the last good checkpoint is {checkpoint}" if checkpoint is not None and checkpoint.exists()
                         else "no checkpoint was written yet")
                raise TrainingDiverged(f"loss became non-finite in epoch {epoch} ({_fmt(epoch_terms)}); {saved}. "
                                       f"Try a lower optim.lr or check the input counts.")
            self.history_.append({"epoch": epoch, **epoch_terms, "threads": torch.get_num_threads()})
            if bar is not None:
                bar.set_postfix_str(_fmt(epoch_terms), refresh=False)
                bar.update()
            if checkpoint is not None and epoch % cfg.optim.checkpoint_every == 0 and epoch < cfg.optim.epochs:
                self.save(checkpoint)  # the final one is saved below, with the training time
        if bar is not None:
            bar.close()
        self.train_seconds_ = time.perf_counter() - start

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The encoder's outputs for each bin: content c, style mean mu, style log-variance."""
        self.model_.eval()
        return tuple(t.cpu().numpy() for t in self.model_.encoder(self._inputs(counts)))

    @torch.no_grad()
    def transform(self, counts: np.ndarray, space: str = "full") -> np.ndarray:
        """Frozen representation of each bin: ``full`` = [c, mu], ``content`` = c, ``style`` = mu."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.model_.eval()
        z = self.model_.represent(self._inputs(counts)).cpu().numpy()
        k = self.config.model.content_dim
        return {"full": z, "content": z[:, :k], "style": z[:, k:]}[space]

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Firing rates g(z) of latents z = [c, s] (content, then style), in the model's input unit."""
        self._check_fitted()
        self.model_.eval()
        device = next(self.model_.parameters()).device
        return self.model_.decoder(torch.as_tensor(np.asarray(z), dtype=torch.float32, device=device)).cpu().numpy()

    @torch.no_grad()
    def reconstruct(self, counts: np.ndarray) -> np.ndarray:
        """Denoised firing rates g([c, mu]) in the model's input unit, over the kept neurons."""
        self.model_.eval()
        return self.model_(self._inputs(counts)).cpu().numpy()

    # -- persistence (no pickled objects: tensors and plain JSON only) -----------------------
    def save(self, path: str | Path) -> Path:
        """Write the fitted model to ``path`` atomically: a crash mid-write never clobbers the
        last good checkpoint."""
        self._check_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "state_dict": {k: v.detach().cpu() for k, v in self.model_.state_dict().items()},
            "neurons": torch.as_tensor(self.neurons_, dtype=torch.int64),
            "meta": json.dumps({"config": self.config.model_dump(mode="json"), "n_channels": self.n_channels_,
                                "bin_size_s": self.bin_size_s_, "history": self.history_,
                                "train_seconds": self.train_seconds_}),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "SwapVAEEstimator":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        state = torch.load(path, map_location=device, weights_only=True)
        meta = json.loads(state["meta"])
        est = cls(SwapVAEConfig.model_validate(meta["config"]))
        est.neurons_ = state["neurons"].numpy()
        est.n_channels_, est.bin_size_s_ = meta["n_channels"], meta["bin_size_s"]
        est.train_seconds_, est.history_ = meta["train_seconds"], meta["history"]
        est.model_ = build_model(est.config, len(est.neurons_))
        est.model_.load_state_dict(state["state_dict"])
        est.model_.to(device).eval()
        return est


def choose_threads(step, choices: tuple[int, ...], rounds: int = 3) -> int:
    """The thread count among ``choices`` (the first preferred on a tie within 5%) that runs
    ``step`` fastest: one untimed step each (a new count pays for waking its pool), then
    ``rounds`` alternating timed steps each, so drift on a shared CPU hits every choice alike."""
    times: dict[int, list[float]] = {n: [] for n in choices}
    for r in range(rounds + 1):
        for n in choices:
            torch.set_num_threads(n)
            t = time.perf_counter()
            step()
            if r:
                times[n].append(time.perf_counter() - t)
    best = choices[0]
    for n in choices[1:]:
        if np.median(times[n]) < 0.95 * np.median(times[best]):
            best = n
    return best


def build_model(cfg: SwapVAEConfig, n_in: int) -> SwapVAE:
    m = cfg.model
    return SwapVAE(n_in, m.hidden_sizes(n_in), m.content_dim, m.style_dim, m.input_transform)


def _thin(x: torch.Tensor, p_min: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """Binomial thinning of spike counts (``x`` is counts * ``scale``): each spike is kept with
    probability p ~ U(p_min, 1), one p per bin."""
    p = p_min + (1 - p_min) * torch.rand(x.shape[0], 1, generator=gen, device=x.device)
    counts = torch.round(x * (1 / scale))
    return torch.binomial(counts, p.expand_as(counts), generator=gen) * scale


def _neuron_dropout(x: torch.Tensor, p_max: float, gen: torch.Generator) -> torch.Tensor:
    """Zero each neuron with probability p ~ U(0, p_max) drawn per sample (no rescaling)."""
    p = torch.rand(x.shape[0], 1, generator=gen, device=x.device) * p_max
    return x * (torch.rand(x.shape, generator=gen, device=x.device) >= p)


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in terms.items())


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="train", unit="epoch", dynamic_ncols=True)
