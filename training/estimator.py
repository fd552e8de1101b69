"""Swap-VAE as a scikit-learn transformer: ``SwapVAE``, imported as ``from swapvae.training import SwapVAE``.

    vae = SwapVAE(epochs=100, lr=1e-3, seed=0).fit(counts, trial=trial)   # raw counts (bins, channels)
    z = vae.transform(counts)             # [c, mu] per bin; transform(counts, space="content") for c
    expected = vae.inverse_transform(z)   # expected counts per bin, over every channel

Hyperparameters are flat keyword arguments (``PARAMS``), so ``get_params``/``set_params``,
``clone`` and a grid search over one of them work. Each names a field of
``schemas.SwapVAEConfig``, which stays the validated source of truth: ``None`` (every
default) leaves the field as ``config`` has it (the default recipe without one), and a value
overrides that field alone, never the rest of its section. ``get_config()`` is the config
they make; ``fit`` validates it and keeps it as ``config_``.

``fit(X, y=None, *, trial=None, bin_in_trial=None)``: rows of X are bins in time order. The
two views of a training pair come from one trial, at most ``jitter`` bins apart: ``trial``
says which rows share one (all rows are one trial without it), ``bin_in_trial`` is a row's
position in its trial (counted in row order when not given). ``y`` is ignored: inside a
Pipeline the trial ids go in as a step fit parameter, ``pipe.fit(X, y, vae__trial=trial)``,
and a grouped search slices them per fold like the rows.

The estimator owns the preprocessing inference must repeat: which recording channels are
kept (static-neuron filter, fitted on the training bins) and the input unit (counts or Hz).
Inputs to every method are raw count vectors over all recorded channels. Fitted state is in
attributes with a trailing underscore; ``save``/``load`` write and read it as tensors and
JSON (never pickles).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import static_filter
from swapvae.training.data import jitter_pairs
from swapvae.training.model import SwapVAENet, poisson_nll
from swapvae.training.stream import HostBatches, choose_placement, data_bytes

SPACES = ("full", "content", "style")

# Each flat hyperparameter and the config field it sets: (section, field), section None at the top.
PARAMS: dict[str, tuple[str | None, str]] = {
    "variant": (None, "variant"), "seed": (None, "seed"), "device": (None, "device"),
    "epochs": ("optim", "epochs"), "lr": ("optim", "lr"), "batch_size": ("optim", "batch_size"),
    "weight_decay": ("optim", "weight_decay"), "cpu_threads": ("optim", "cpu_threads"),
    "kl_weight": ("loss", "kl_weight"), "align_weight": ("loss", "align_weight"), "swap": ("loss", "swap"),
    "content_dim": ("model", "content_dim"), "style_dim": ("model", "style_dim"), "hidden": ("model", "hidden"),
    "shared_width": ("model", "shared_width"), "calibrate_epochs": ("calibrate", "epochs"),
    "input_unit": ("data", "input_unit"), "jitter": ("data", "jitter"), "dropout_max": ("data", "dropout_max"),
    "static_std": ("data", "static_std"), "whole_counts": ("data", "whole_counts"),
}

# scikit-learn's estimator checks that cannot apply to this model, each with the reason: pass
# it as ``check_estimator(..., expected_failed_checks=...)`` (tests/test_sklearn.py does).
EXPECTED_FAILED_CHECKS: dict[str, str] = {
    "check_methods_subset_invariance":
        "transform computes in float32 (the model's and the bundle's precision), and BLAS blocks a matrix "
        "product differently for a batch of 1 than of 20 rows: a latent then differs in its last bits "
        "(seen: 3e-7 on one value of 2560), over the check's absolute tolerance of 1e-7",
}


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


def is_sessions(X) -> bool:
    """Whether ``X`` is several sessions' bins (a list of 2-D arrays) rather than one session's."""
    return isinstance(X, (list, tuple)) and len(X) > 0 and all(np.ndim(x) == 2 for x in X)


def positions_in_trials(trial: np.ndarray) -> np.ndarray:
    """Each row's position among the rows of its trial, counted in row order."""
    order = np.argsort(trial, kind="stable")
    ordered = trial[order]
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]
    lengths = np.diff(np.r_[starts, len(trial)])
    pos = np.empty(len(trial), dtype=np.int64)
    pos[order] = np.arange(len(trial)) - np.repeat(starts, lengths)
    return pos


class SwapVAE(TransformerMixin, BaseEstimator):
    """Swap-VAE on binned spike counts (the module docstring says how to use it).

    Parameters: ``config`` (a ``SwapVAEConfig`` or its dict; the default recipe if None),
    then one keyword per entry of ``PARAMS`` overriding that config field (None: keep it),
    and ``verbose`` (a progress bar while fitting)."""

    def __init__(self, *, config=None, variant=None, seed=None, device=None, epochs=None, lr=None,
                 batch_size=None, weight_decay=None, cpu_threads=None, kl_weight=None, align_weight=None,
                 swap=None, content_dim=None, style_dim=None, hidden=None, shared_width=None,
                 calibrate_epochs=None, input_unit=None, jitter=None, dropout_max=None, static_std=None,
                 whole_counts=None, verbose=False):
        self.config = config
        self.variant = variant
        self.seed = seed
        self.device = device
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.cpu_threads = cpu_threads
        self.kl_weight = kl_weight
        self.align_weight = align_weight
        self.swap = swap
        self.content_dim = content_dim
        self.style_dim = style_dim
        self.hidden = hidden
        self.shared_width = shared_width
        self.calibrate_epochs = calibrate_epochs
        self.input_unit = input_unit
        self.jitter = jitter
        self.dropout_max = dropout_max
        self.static_std = static_std
        self.whole_counts = whole_counts
        self.verbose = verbose

    def get_config(self) -> SwapVAEConfig:
        """The validated config these parameters make (pydantic's ValidationError, a
        ValueError, names a bad one)."""
        base = self.config if self.config is not None else SwapVAEConfig()
        if not isinstance(base, SwapVAEConfig):
            base = SwapVAEConfig.model_validate(base)
        changes: dict = {}
        for name, (section, field) in PARAMS.items():
            value = getattr(self, name)
            if value is not None:
                (changes if section is None else changes.setdefault(section, {}))[field] = value
        return base.with_overrides(**changes) if changes else base

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True  # spike counts
        tags.transformer_tags.preserves_dtype = ["float32"]  # the model computes in float32
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    # -- preprocessing shared by fit and transform -------------------------------------------
    @property
    def input_scale(self) -> float:
        """Multiplier from counts to model input (1, or 1 / bin size for Hz)."""
        return 1.0 / self.bin_size_s_ if self.config_.data.input_unit == "hz" else 1.0

    def _counts(self, X, reset: bool) -> np.ndarray:
        """X validated as a float32 (bins, channels) array of non-negative counts."""
        X = validate_data(self, X, reset=reset, dtype=np.float32, ensure_min_samples=2 if reset else 1)
        if (X < 0).any():
            r, c = np.argwhere(X < 0)[0]
            raise ValueError(f"Negative values in data passed to {type(self).__name__}: spike counts must be >= 0, "
                             f"found {X[r, c]} at row {r}, channel {c}")
        return X

    def _inputs(self, X) -> torch.Tensor:
        """Model input of new bins X, on the model's device."""
        check_is_fitted(self)
        if hasattr(self, "sessions_"):
            raise ValueError(f"this model was fitted on {len(self.sessions_)} sessions: use one session's, "
                             f"sessions_[i].transform(X) (the same for the other methods)")
        return self._model_input(self._counts(X, reset=False), next(self.model_.parameters()).device)

    def _model_input(self, counts: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.as_tensor(counts[:, self.neurons_] * np.float32(self.input_scale)).to(device)

    # -- training ------------------------------------------------------------------------------
    def fit(self, X, y=None, *, trial=None, bin_in_trial=None, neurons=None, bin_size_s: float = 0.1,
            checkpoint: str | Path | None = None, held_out=None, resume: str | Path | None = None) -> SwapVAE:
        """Train on the bins ``X`` (raw counts over all channels, rows in time order).

        ``trial``: trial id of each row, a keyword (all rows are one trial if None); trials are
        contiguous and in time order, so the ids never decrease along the rows. ``bin_in_trial``:
        each row's position in its trial (counted in row order if None). ``y`` is ignored: it is
        the place scikit-learn gives a Pipeline's target, so trial ids passed there, as in
        ``fit(X, trial)``, would be ignored; that case warns and says ``trial=``.
        ``neurons``: the channels to keep (the static filter's choice on X if None);
        ``bin_size_s``: the bin width, for input in Hz; ``checkpoint``: a file to save to every
        ``optim.checkpoint_every`` epochs and at the end. Counts must be whole numbers unless
        ``data.whole_counts`` is off. ``held_out``: bins (raw counts) that the history scores
        every ``epochs // 100`` epochs beside a fixed set of training bins (``rec_train``, ``rec_held_out``:
        the Poisson NLL per bin of the denoised rates, its constant omitted); they play no part
        in training, which draws the same random numbers with them or without. ``resume``: a
        checkpoint that a fit of the same config and data wrote before it stopped; training
        goes on from its epoch, with its optimizer and random-number states, to the result an
        uninterrupted fit gives (bit-equal at the thread count it recorded)."""
        cfg = self.get_config()
        if is_sessions(X):  # several sessions: one shared core (training.sessions)
            from swapvae.training.sessions import fit_sessions

            if resume is not None:
                raise ValueError("resume continues a single-session fit; a shared core's training restarts")

            return fit_sessions(self, cfg, X, trial, bin_in_trial, neurons, bin_size_s, checkpoint, held_out)
        if y is not None and trial is None:
            warnings.warn(f"{type(self).__name__}.fit ignores y (a Pipeline's target); trial ids go in as the keyword "
                          f"trial= (in a Pipeline: vae__trial=). Fitting with all rows one trial.", UserWarning,
                          stacklevel=2)
        counts = self._counts(X, reset=True)
        trial, bin_in_trial, keep = self._checked(counts, trial, bin_in_trial, neurons, cfg)
        device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.config_, self.bin_size_s_, self.neurons_ = cfg, float(bin_size_s), keep
        self.channel_mean_ = counts.mean(axis=0)
        self.model_ = build_model(cfg, len(keep)).to(device)
        pairs = jitter_pairs(trial, bin_in_trial, cfg.data.jitter)
        self.placement_ = choose_placement(cfg.data.placement, device, data_bytes(len(counts), len(keep), len(pairs)))
        state = None if resume is None else self._resumable(resume)
        if self.placement_ == "device":
            x, pairs = self._model_input(counts, device), torch.as_tensor(pairs, device=device)
            step, stream = (lambda model, opt, gen: self._step(model, opt, x, pairs, gen)), None
        else:  # the bins stay in host memory; each step's rows are shipped over (training.stream)
            x = self._model_input(counts, torch.device("cpu"))
            stream = HostBatches(x, pairs, cfg.optim.batch_size, device, cfg.seed, cfg.data.stream_chunk_steps)
            step = lambda model, opt, gen: self._learn(model, opt, *self._dropout(*stream.next(), gen))  # noqa: E731
        monitor = None if held_out is None else self._monitor(x, self._inputs_of(held_out, device))
        try:
            self._optimise(step, self._adam, steps_per_epoch(cfg, len(x)), checkpoint, monitor, state, stream)
        finally:
            if stream is not None:
                stream.close()
        return self

    def _resumable(self, path: str | Path) -> dict:
        """The training state in checkpoint ``path``, checked against this fit's config and kept
        channels (ValueError naming what differs). On the CPU, where random-number states live."""
        state = _read_checkpoint(Path(path), "cpu")
        meta = json.loads(state["meta"])
        if "training" not in meta:
            raise ValueError(f"{path}: no training state to resume from (a finished training's checkpoint, or one "
                             f"written before checkpoints held it)")
        if meta["config"] != self.config_.model_dump(mode="json"):
            theirs, ours = SwapVAEConfig.model_validate(meta["config"]), self.config_
            diff = sorted(k for k in ours.model_dump() if getattr(theirs, k) != getattr(ours, k))
            raise ValueError(f"{path} was written with another config (differs in: {', '.join(diff)}): resume with "
                             f"the config it was trained with")
        if not np.array_equal(state["neurons"].numpy(), self.neurons_):
            raise ValueError(f"{path} was trained on other channels ({len(state['neurons'])} kept, not "
                             f"{len(self.neurons_)}): resume on the data it was trained on")
        return {**state, **meta["training"], "history": meta["history"]}

    def _checked(self, counts: np.ndarray, trial, bin_in_trial, neurons, cfg: SwapVAEConfig, what: str = "X"):
        """(trial, bin_in_trial, kept channels) of validated ``counts`` (rows of one session),
        or ValueError naming the problem."""
        if cfg.data.whole_counts and not np.array_equal(counts, np.round(counts)):
            r, c = np.argwhere(counts != np.round(counts))[0]
            raise ValueError(f"counts must be whole numbers (spike counts), found {counts[r, c]} at row {r}, channel "
                             f"{c} of {what}; for rates or smoothed counts set whole_counts=False (data.whole_counts)")
        n = len(counts)
        trial = np.zeros(n, dtype=np.int64) if trial is None else np.asarray(trial)
        if trial.shape != (n,):
            raise ValueError(f"trial must hold one id per row of {what} ({n}), got shape {trial.shape}")
        back = np.flatnonzero(np.diff(trial) < 0)
        if back.size:  # the in-trial view pairs count on this order, as the recording readers do
            raise ValueError(f"trial ids must not decrease along the rows (rows in time order, each trial "
                             f"contiguous); trial {trial[back[0]]} is followed by {trial[back[0] + 1]} at row "
                             f"{back[0] + 1} of {what}")
        bin_in_trial = positions_in_trials(trial) if bin_in_trial is None else np.asarray(bin_in_trial)
        if bin_in_trial.shape != (n,):
            raise ValueError(f"bin_in_trial must hold one position per row of {what} ({n}), got shape "
                             f"{bin_in_trial.shape}")
        keep = np.asarray(neurons) if neurons is not None else static_filter(counts, cfg.data.static_std)
        if keep.size == 0:
            raise ValueError(f"every channel of {what} is static (std <= data.static_std = {cfg.data.static_std}): "
                             f"nothing to learn from")
        return trial, bin_in_trial, keep

    def _adam(self, model: torch.nn.Module, lr: float | None = None):
        """Adam on the parameters that learn (fused: one kernel for all of them instead of a
        Python loop of small ops per step)."""
        cfg = self.config_
        return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr or learning_rate(cfg),
                                weight_decay=cfg.optim.weight_decay, fused=True)

    def _optimise(self, step, make_opt, steps_per_epoch: int, checkpoint=None, monitor=None,
                  resume: dict | None = None, stream=None) -> None:
        """Train ``model_`` for ``optim.epochs`` epochs of ``step(model, opt, gen)`` (one
        optimiser step, returning the loss terms), on the thread count chosen once; save to
        ``checkpoint`` as the loop says (with the state to resume from) and at the end.
        ``resume``: a checkpoint's training state (``_resumable``), to go on from. ``stream``:
        the ``HostBatches`` that ``step`` reads, sought to the first step trained here."""
        cfg = self.config_
        device = next(self.model_.parameters()).device
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
        opt = make_opt(self.model_)
        checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.history_ = []
        self.train_seconds_ = float("nan")
        threads = torch.get_num_threads()
        first, spent = 1, 0.0
        if resume is not None:
            self.model_.load_state_dict(resume["state_dict"])
            opt.load_state_dict(resume["optimizer"])
            gen.set_state(resume["generator"])
            torch.set_rng_state(resume["rng"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(resume["cuda_rng"], device)
            self.history_ = resume["history"]
            first, spent = resume["epoch"] + 1, resume["seconds"]

        def training_state(epoch: int, seconds: float) -> dict:
            return {"optimizer": opt.state_dict(), "generator": gen.get_state(), "rng": torch.get_rng_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}),
                    "meta": {"epoch": epoch, "seconds": seconds, "threads": torch.get_num_threads()}}
        try:
            if device.type == "cpu":  # a resumed fit keeps the count it recorded: the same bits
                torch.set_num_threads(cfg.optim.cpu_threads or (resume or {}).get("threads")
                                      or self._calibrate_threads(step, make_opt, threads))
            if stream is not None:  # after the thread count's trial steps, which drew from it too
                stream.seek((first - 1) * steps_per_epoch)
            self._train(lambda: step(self.model_, opt, gen), steps_per_epoch, checkpoint, monitor, first,
                        spent, training_state)
        finally:
            torch.set_num_threads(threads)
        self.model_.eval()
        if checkpoint is not None:
            self.save(checkpoint)

    def _views(self, x: torch.Tensor, pairs: torch.Tensor, gen: torch.Generator, n: int):
        """The two views of ``n`` in-trial pairs drawn from ``pairs`` (rows of ``x``), neuron
        dropout applied (the dropped bin is the view and its target)."""
        idx = pairs[torch.randint(len(pairs), (n,), generator=gen, device=x.device)]
        return self._dropout(*x[idx.T.reshape(-1)].chunk(2), gen)  # one gather for both views

    def _dropout(self, x1: torch.Tensor, x2: torch.Tensor, gen: torch.Generator):
        p = self.config_.data.dropout_max
        if p > 0:
            x1, x2 = _neuron_dropout(x1, p, gen), _neuron_dropout(x2, p, gen)
        return x1, x2

    def _step(self, model: SwapVAENet, opt, x: torch.Tensor, pairs: torch.Tensor, gen: torch.Generator) -> dict:
        """One optimiser step on a batch of in-trial view pairs; returns the loss terms."""
        return self._learn(model, opt, *self._views(x, pairs, gen, self.config_.optim.batch_size))

    def _learn(self, model: SwapVAENet, opt, x1: torch.Tensor, x2: torch.Tensor) -> dict:
        """One optimiser step on the views ``x1``, ``x2``; returns the loss terms."""
        cfg = self.config_
        with autocast(cfg, x1.device):
            out = model.loss(x1, x2, cfg.loss.swap, cfg.loss.kl_weight, cfg.loss.align_weight, cfg.loss.eps)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out

    def _calibrate_threads(self, step, make_opt, cores: int) -> int:
        """Training's CPU thread count when ``optim.cpu_threads`` is 0: one per core or one,
        whichever runs a training step faster here and now (one thread wins beside other busy
        processes, whose cores OpenMP's barriers wait for). Timed on a scratch copy of the
        model with its own random draws, so the run itself is exactly the run it would be with
        that thread count fixed: a run is bit-reproducible for a seed at a given thread count,
        and BLAS may sum in a different order at another one."""
        if cores < 2:
            return 1
        scratch = copy.deepcopy(self.model_)
        opt = make_opt(scratch)
        gen = torch.Generator(device=next(scratch.parameters()).device).manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            return choose_threads(lambda: step(scratch, opt, gen), (cores, 1))

    def _train_mode(self) -> None:
        """``model_`` learning, but for modules kept as they are (a frozen core: its BatchNorm
        statistics too)."""
        self.model_.train()
        for m in getattr(self, "frozen_", ()):
            m.eval()

    def _inputs_of(self, X, device: torch.device) -> torch.Tensor:
        return self._model_input(self._counts(X, reset=False), device)

    def _monitor(self, x: torch.Tensor, held_out: torch.Tensor, n: int = 2048):
        """Per-bin Poisson NLL of the denoised rates g([c, mu]) of up to ``n`` fixed training
        bins and of ``held_out``, in eval mode: no randomness drawn, nothing learned."""
        train = x[torch.linspace(0, len(x) - 1, min(n, len(x)), device=x.device).long()].to(held_out.device)
        eps = self.config_.loss.eps

        @torch.no_grad()
        def measure() -> dict[str, float]:
            self.model_.eval()
            try:
                return {f"rec_{name}": poisson_nll(b, self.model_(b), eps).item()
                        for name, b in (("train", train), ("held_out", held_out))}
            finally:
                self._train_mode()
        return measure

    def _train(self, step, steps_per_epoch, checkpoint, monitor=None, first: int = 1, spent: float = 0.0,
               training_state=None) -> None:
        cfg, device = self.config_, next(self.model_.parameters()).device
        bar = _progress(cfg.optim.epochs, self.verbose, first - 1)
        terms = ("loss", "rec", "kl", "align")
        start = time.perf_counter() - spent
        self._train_mode()
        for epoch in range(first, cfg.optim.epochs + 1):
            sums = torch.zeros(len(terms), device=device)
            for _ in range(steps_per_epoch):
                out = step()
                sums += torch.stack([out[k].detach() for k in terms])
            epoch_terms = dict(zip(terms, (sums / steps_per_epoch).tolist()))
            if monitor is not None and (epoch % max(1, cfg.optim.epochs // 100) == 0 or epoch == cfg.optim.epochs):
                epoch_terms.update(monitor())  # about 100 points a curve: a few % of the training time
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
                # the final one is saved below, with the training time and without the state to resume from
                self.save(checkpoint, training_state(epoch, time.perf_counter() - start) if training_state else None)
        if bar is not None:
            bar.close()
        self.train_seconds_ = time.perf_counter() - start

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, X) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The encoder's outputs for each bin: content c, style mean mu, style log-variance."""
        x = self._inputs(X)
        self.model_.eval()
        return tuple(t.cpu().numpy() for t in self.model_.encoder(x))

    @torch.no_grad()
    def transform(self, X, space: str = "full") -> np.ndarray:
        """Frozen representation of each bin (float32): ``full`` = [c, mu], ``content`` = c,
        ``style`` = mu."""
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        x = self._inputs(X)
        self.model_.eval()
        z = self.model_.represent(x).cpu().numpy()
        k = self.config_.model.content_dim
        return {"full": z, "content": z[:, :k], "style": z[:, k:]}[space]

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        """Firing rates g(z) of latents z = [c, s] (content, then style), in the model's input
        unit, over the kept neurons."""
        check_is_fitted(self)
        width = self.config_.model.content_dim + self.config_.model.style_dim
        z = check_array(z, dtype=np.float32)
        if z.shape[1] != width:
            raise ValueError(f"latents must have {width} columns ([c, s]: content then style), got {z.shape[1]}")
        self.model_.eval()
        return self.model_.decoder(torch.as_tensor(z, device=next(self.model_.parameters()).device)).cpu().numpy()

    def inverse_transform(self, X) -> np.ndarray:
        """Expected spike counts per bin over every recorded channel, from latents [c, s] (what
        ``transform`` gives), or from contents c alone (``transform(X, space="content")``; the
        style then at its prior's mean, 0): the decoder's rates in counts, and the channels the
        static filter dropped at their mean over the training bins."""
        check_is_fitted(self)
        z = check_array(X, dtype=np.float32)
        k, s = self.config_.model.content_dim, self.config_.model.style_dim
        if z.shape[1] == k and k:
            z = np.hstack([z, np.zeros((len(z), s), np.float32)])
        rates = self.decode(z) / np.float32(self.input_scale)
        out = np.repeat(self.channel_mean_[None, :].astype(np.float32), len(rates), axis=0)
        out[:, self.neurons_] = rates
        return out

    @torch.no_grad()
    def reconstruct(self, X) -> np.ndarray:
        """Denoised firing rates g([c, mu]) in the model's input unit, over the kept neurons
        (the bundle's ``rates`` output)."""
        x = self._inputs(X)
        self.model_.eval()
        return self.model_(x).cpu().numpy()

    # -- across sessions (training.sessions) --------------------------------------------------------
    def calibrate(self, X, trial=None, *, bin_in_trial=None, neurons=None, bin_size_s: float | None = None,
                  checkpoint: str | Path | None = None, held_out=None) -> SwapVAE:
        """A fitted estimator for a new session's bins ``X`` (its own channels): this model's
        core, frozen unless ``calibrate.core_lr`` (config), with a new read-in and read-out
        trained on ``X`` without labels. This model must have been fitted on several sessions
        (``fit([X_a, X_b, ...])``); it is left as it was. Arguments as ``fit``'s."""
        from swapvae.training.sessions import calibrate

        check_is_fitted(self)
        return calibrate(self, X, trial, bin_in_trial, neurons, bin_size_s, checkpoint, held_out)

    # -- to the rig ------------------------------------------------------------------------------
    def export(self, bundle_dir: str | Path, readout=None, X=None, trial=None, *, opset: int = 17,
               weights: str = "fp32", sign: str | Path | None = None, force: bool = False):
        """Write the fitted model as a bundle the runtime serves (``swapvae export`` without a
        run directory), checked as that command checks it: the ONNX graphs and the runtime's
        engine must reproduce this model on bins ``X`` (raw counts in time order, ``trial``
        each one's trial; default: 64 bins drawn from the training bins' channel means) within
        1e-4, or nothing is written. ``readout``: the product readout
        (``swapvae.training.readout.fit_readout(...).readout``); without it the bundle serves
        latents and rates only. An existing ``bundle_dir`` is refused unless ``force``. Returns
        the manifest."""
        from swapvae.training.export import export_estimator, training_info
        from swapvae.training.verify import check_bins_of

        check_is_fitted(self)
        if X is None:
            X = np.random.default_rng(self.config_.seed).poisson(self.channel_mean_, (64, self.n_features_in_))
            trial = None
        bins = check_bins_of(self._counts(X, reset=False), trial)
        return export_estimator(self, bundle_dir, readout, bins, training_info(self), opset, weights, sign, force)

    # -- persistence (no pickled objects: tensors and plain JSON only) -----------------------
    def save(self, path: str | Path, training: dict | None = None) -> Path:
        """Write the fitted model to ``path`` atomically: a crash mid-write never clobbers the
        last good checkpoint. ``training``: the state a fit resumes from (optimizer, random
        number generators, epoch), written by the training loop."""
        check_is_fitted(self)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config_.model_dump(mode="json"), "bin_size_s": self.bin_size_s_,
                "history": self.history_, "train_seconds": self.train_seconds_}
        state = {"state_dict": {k: v.detach().cpu() for k, v in self.model_.state_dict().items()}}
        views = getattr(self, "sessions_", None) or [self]
        for i, v in enumerate(views):  # one session, or each of a shared core's (suffixed by index)
            tag = f"_{i}" if hasattr(self, "sessions_") else ""
            state[f"neurons{tag}"] = torch.as_tensor(v.neurons_, dtype=torch.int64)
            state[f"channel_mean{tag}"] = torch.as_tensor(v.channel_mean_, dtype=torch.float32)
        if hasattr(self, "sessions_"):
            meta["sessions"] = [v.n_features_in_ for v in views]
        else:
            meta["n_channels"] = self.n_features_in_
        if training is not None:
            training = dict(training)
            meta["training"] = training.pop("meta")
            state.update(training)
        state["meta"] = json.dumps(meta)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SwapVAE:
        """A fitted estimator from a checkpoint ``save`` wrote, its model on ``device``."""
        path = Path(path)
        state = _read_checkpoint(path, device)
        meta = json.loads(state["meta"])
        config = meta["config"]
        est = cls(config=SwapVAEConfig.model_validate(config))
        est.config_ = est.config
        if "sessions" in meta:  # a shared core and its sessions' read-ins and read-outs
            from swapvae.training.model import SharedCore
            from swapvae.training.sessions import session_view

            cfg, n = est.config_, len(meta["sessions"])
            neurons = [state[f"neurons_{i}"].numpy() for i in range(n)]
            est.model_ = SharedCore([len(k) for k in neurons], list(cfg.model.shared_hidden()), cfg.model.content_dim,
                                    cfg.model.style_dim)
            est.model_.load_state_dict(state["state_dict"])
            est.model_.to(device).eval()
            est.bin_size_s_, est.history_ = meta["bin_size_s"], meta["history"]
            est.train_seconds_ = meta["train_seconds"]
            est.sessions_ = []
            for i, keep in enumerate(neurons):
                view = session_view(cls, cfg, est.model_, i, state[f"channel_mean_{i}"].numpy(), keep, est.bin_size_s_)
                view.history_, view.train_seconds_ = est.history_, est.train_seconds_
                est.sessions_.append(view)
            return est
        est.neurons_ = state["neurons"].numpy()
        est.n_features_in_, est.bin_size_s_ = meta["n_channels"], meta["bin_size_s"]
        est.channel_mean_ = state["channel_mean"].numpy()
        est.train_seconds_, est.history_ = meta["train_seconds"], meta["history"]
        est.model_ = build_model(est.config_, len(est.neurons_))
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


def steps_per_epoch(cfg: SwapVAEConfig, n_bins: int) -> int:
    """optim.steps_per_epoch, or one pass over ``n_bins`` bins when it is 0."""
    return cfg.optim.steps_per_epoch or max(1, n_bins // cfg.optim.batch_size)


def learning_rate(cfg: SwapVAEConfig) -> float:
    """optim.lr under optim.lr_batch_rule (sqrt: scaled by sqrt(batch_size / 256))."""
    o = cfg.optim
    return o.lr * (math.sqrt(o.batch_size / 256) if o.lr_batch_rule == "sqrt" else 1.0)


def autocast(cfg: SwapVAEConfig, device: torch.device):
    """The forward pass's precision: bfloat16 autocast for optim.precision bf16, else nothing."""
    if cfg.optim.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: SwapVAEConfig, n_in: int) -> SwapVAENet:
    m = cfg.model
    return SwapVAENet(n_in, m.hidden_sizes(n_in), m.content_dim, m.style_dim)


def _neuron_dropout(x: torch.Tensor, p_max: float, gen: torch.Generator) -> torch.Tensor:
    """Zero each neuron with probability p ~ U(0, p_max) drawn per sample (no rescaling)."""
    p = torch.rand(x.shape[0], 1, generator=gen, device=x.device) * p_max
    return x * (torch.rand(x.shape, generator=gen, device=x.device) >= p)


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in terms.items())


def _progress(total: int, enabled: bool, done: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="epoch", dynamic_ncols=True)


def _read_checkpoint(path: Path, device) -> dict:
    """The entries of a checkpoint ``SwapVAE.save`` wrote (its meta JSON readable, with a
    config), loaded without unpickling anything; ValueError (or FileNotFoundError) naming why not."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    not_ours = f"{path}: not a checkpoint written by SwapVAE.save"
    try:  # weights_only: tensors and plain values; anything else is refused, never unpickled
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not the user's concern
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - torch's message advises weights_only=False, which is unsafe here
        raise ValueError(f"{not_ours}: it is not a file of tensors and plain values (refused without "
                         f"unpickling it)") from None
    try:
        json.loads(state["meta"])["config"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{not_ours}: no readable {e} entry") from None
    return state
