"""One Swap-VAE across sessions, and a new session calibrated onto it.

    vae = SwapVAE().fit([X_a, X_b], trial=[t_a, t_b])    # a shared core; vae.sessions_[i]: session i
    new = vae.calibrate(X_new, trial=t_new)              # a fresh read-in/read-out, the core frozen

Each session has its own read-in (the encoder's first Linear + BatchNorm, over its kept
channels) and read-out (the decoder's last Linear); the rest is one core
(``training.model.SharedCore``). Training batches mix sessions: each step draws its view pairs
uniformly from all sessions' in-trial pairs, so a session weighs by its bins, and a pair never
crosses sessions. ``sessions_[i]`` is an ordinary fitted single-session ``SwapVAE`` (its model
the core's modules, ``hidden`` written out with the core's width) that transforms, saves and
exports as one.

``calibrate`` fits a new session (another day, another set of units) without touching the
trained model: a copy of the core, kept frozen (its BatchNorm statistics too) unless
``calibrate.core_lr`` fine-tunes it, and a new read-in and read-out trained on the new
session's bins with the Swap-VAE loss, which needs no labels. What the readout then does with
few or no labels is ``training.calibration``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.utils.validation import check_array

from swapvae.schemas import SwapVAEConfig
from swapvae.training.data import jitter_pairs
from swapvae.training.model import SharedCore


def _listed(value, n: int, what: str) -> list:
    if value is None:
        return [None] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"with {n} sessions, {what} must be a list of {n} (one per session), got "
                         f"{type(value).__name__}")
    return list(value)


def _session_counts(X, what: str) -> np.ndarray:
    counts = check_array(X, dtype=np.float32, ensure_min_samples=2)
    if (counts < 0).any():
        r, c = np.argwhere(counts < 0)[0]
        raise ValueError(f"spike counts must be >= 0, found {counts[r, c]} at row {r}, channel {c} of {what}")
    return counts


def session_config(cfg: SwapVAEConfig) -> SwapVAEConfig:
    """A session's config: ``hidden`` with the core's width written out, so that the session's
    network is ``build_model(config, n_kept)`` (how a checkpoint of it is read back)."""
    return cfg.with_overrides(model={"hidden": list(cfg.model.shared_hidden())})


def session_view(cls, cfg: SwapVAEConfig, core: SharedCore, s: int, channel_mean: np.ndarray, keep: np.ndarray,
                 bin_size_s: float):
    """Session ``s`` of ``core`` as a fitted single-session estimator (its model the core's
    modules): ``channel_mean`` over all its recorded channels, ``keep`` the kept ones."""
    view = cls(config=session_config(cfg))
    view.config_, view.bin_size_s_, view.neurons_ = view.config, float(bin_size_s), np.asarray(keep)
    view.n_features_in_, view.channel_mean_ = len(channel_mean), np.asarray(channel_mean, np.float32)
    view.model_ = core.net(s)
    view.history_, view.train_seconds_ = [], float("nan")
    return view


def fit_sessions(est, cfg: SwapVAEConfig, Xs, trials, bin_in_trials, neurons, bin_size_s, checkpoint, held_out):
    """``est.fit`` of several sessions (the module doc): ``model_`` is the SharedCore, ``sessions_``
    the sessions' single-session views. Lists hold one entry per session; ``bin_size_s`` one
    number or one per session (they must agree: the core learns bins of one width)."""
    from swapvae.training.estimator import autocast, resolve_device, steps_per_epoch

    n = len(Xs)
    trials, bins_in, neurons = _listed(trials, n, "trial"), _listed(bin_in_trials, n, "bin_in_trial"), \
        _listed(neurons, n, "neurons")
    sizes = [float(b) for b in _listed(bin_size_s, n, "bin_size_s")] if isinstance(bin_size_s, (list, tuple)) \
        else [float(bin_size_s)] * n
    if len(set(sizes)) > 1:
        raise ValueError(f"sessions with different bin sizes ({', '.join(f'{b:g} s' for b in sizes)}): one core "
                         f"learns bins of one width; bin them alike (--bin-size for NWB files)")
    if held_out is not None:
        raise ValueError("held_out scores one session's bins; with several sessions, score each session's view")
    if cfg.data.placement == "host":  # auto keeps them on the device
        raise ValueError("data.placement 'host' streams one session's bins; a core shared across sessions keeps "
                         "its sessions on the training device (placement 'auto' or 'device')")
    sessions = []
    for i, X in enumerate(Xs):
        counts = _session_counts(X, f"session {i}")
        t, b, keep = est._checked(counts, trials[i], bins_in[i], neurons[i], cfg, f"session {i}")
        sessions.append((counts, t, b, keep))
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    core = SharedCore([len(k) for *_, k in sessions], list(cfg.model.shared_hidden()), cfg.model.content_dim,
                      cfg.model.style_dim).to(device)
    est.config_, est.bin_size_s_, est.model_ = cfg, sizes[0], core
    est.sessions_ = [session_view(type(est), cfg, core, i, c.mean(axis=0), k, sizes[0])
                     for i, (c, _, _, k) in enumerate(sessions)]
    xs = [v._model_input(c, device) for v, (c, *_) in zip(est.sessions_, sessions)]
    pairs = [torch.as_tensor(jitter_pairs(t, b, cfg.data.jitter), device=device) for _, t, b, _ in sessions]
    bounds = torch.as_tensor(np.cumsum([len(p) for p in pairs]), device=device)

    def step(model: SharedCore, opt, gen):
        # each pair drawn uniformly from all sessions' pairs: first how many of each session's
        which = torch.randint(int(bounds[-1]), (cfg.optim.batch_size,), generator=gen, device=device)
        per_session = torch.bincount(torch.searchsorted(bounds, which, right=True), minlength=n).tolist()
        views = [(s, *est._views(xs[s], pairs[s], gen, k)) for s, k in enumerate(per_session) if k]
        with autocast(cfg, device):
            out = model.loss(views, cfg.loss.swap, cfg.loss.kl_weight, cfg.loss.align_weight, cfg.loss.eps)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out

    est._optimise(step, est._adam, steps_per_epoch(cfg, sum(len(x) for x in xs)), checkpoint)
    for view in est.sessions_:
        view.history_, view.train_seconds_ = est.history_, est.train_seconds_
        view.model_.eval()
    return est


def calibrate(est, X, trial=None, bin_in_trial=None, neurons=None, bin_size_s: float | None = None,
              checkpoint=None, held_out=None):
    """A fitted single-session estimator for a new session's bins ``X``: a copy of ``est``'s
    core (``est`` itself is left as it was) with a new read-in and read-out trained on ``X``
    for ``calibrate.epochs`` epochs at ``calibrate.lr`` (the core frozen unless
    ``calibrate.core_lr``); the rest as ``fit``."""
    from swapvae.training.estimator import SwapVAE, steps_per_epoch

    if not isinstance(getattr(est, "model_", None), SharedCore):
        raise ValueError("calibrate needs a model trained with a shared core (SwapVAE().fit([X_a, X_b, ...]), "
                         "swapvae train --shared); this one was trained on one session alone")
    ref = est.config_
    bin_size_s = est.bin_size_s_ if bin_size_s is None else float(bin_size_s)
    if abs(bin_size_s - est.bin_size_s_) > 1e-9:
        raise ValueError(f"the new session has bins of {bin_size_s:g} s but the core was trained on bins of "
                         f"{est.bin_size_s_:g} s: bin it alike (--bin-size for NWB files)")
    counts = _session_counts(X, "the new session")
    try:
        trial, bin_in_trial, keep = est._checked(counts, trial, bin_in_trial, neurons, ref, "the new session")
    except ValueError as e:
        if "static" in str(e):
            raise ValueError(f"every channel of the new session is static over its training bins (std <= "
                             f"{ref.data.static_std}): nothing to calibrate the read-in on") from None
        raise
    cal = ref.calibrate
    cfg = ref.with_overrides(optim={"epochs": cal.epochs, "lr": cal.lr})
    torch.manual_seed(cfg.seed)
    core = copy.deepcopy(est.model_)
    s = core.add_session(len(keep))
    new = session_view(SwapVAE, cfg, core, s, counts.mean(axis=0), keep, bin_size_s)
    new.verbose = est.verbose
    fine_tune = cal.core_lr > 0
    for p in (p for m in core.core() for p in m.parameters()):
        p.requires_grad_(fine_tune)
    new.frozen_ = [] if fine_tune else core.core()  # eval mode: its BatchNorm statistics stay as trained

    def make_opt(net):  # the read-in and read-out at calibrate.lr, the core (if it learns) at core_lr
        enc, dec = net.encoder.net, net.decoder.net
        groups = [{"params": [*enc[:3].parameters(), *dec[-2:].parameters()]}]
        if fine_tune:
            groups.append({"params": [*enc[3:].parameters(), *dec[:-2].parameters()], "lr": cal.core_lr})
        return torch.optim.Adam(groups, lr=cal.lr, weight_decay=cfg.optim.weight_decay)

    device = next(core.parameters()).device
    x = new._model_input(counts, device)
    pairs = torch.as_tensor(jitter_pairs(trial, bin_in_trial, cfg.data.jitter), device=device)
    monitor = None if held_out is None else new._monitor(x, new._inputs_of(held_out, device))
    def step(model, opt, gen):
        return new._step(model, opt, x, pairs, gen)
    new._optimise(step, make_opt, steps_per_epoch(cfg, len(x)), checkpoint, monitor)
    for p in new.model_.parameters():
        p.requires_grad_(True)
    new.frozen_ = []
    return new

