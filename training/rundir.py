"""A training run directory: the one module that knows its files and how to reopen a run.

    config.json     the SwapVAEConfig, written first (a crashed run still says what it was)
    checkpoint.pt   weights, neuron selection and loss history: tensors and JSON, no pickles
                    (while training: also the optimizer and random-number states and the
                    epoch, which ``swapvae train --resume`` goes on from)
    history.json    the loss terms per epoch, readable
    readout.json    the fitted readouts, plain arrays
    metrics.json    the evaluation
    run.json        the data it was trained on (the file's absolute path and sha256, or a
                    built-in session's name) and how an NWB file was read, so later steps
                    rebuild the same session and split from any folder; ``"split":
                    "validation"`` for a run scored on its training trials (``run_split``)

A run trained with a shared core (``swapvae train --shared``) holds several sessions: run.json
lists them, metrics.json has each one's metrics under ``sessions``, ``readout-I.json`` is
session I's readout, and ``reference.npz`` the sessions' labelled training bins as latents of
the shared space (a new day's readout without labels, ``swapvae calibrate --labelled-trials
0``). A calibrated run (``swapvae calibrate``) is an ordinary one whose run.json also names the
run it was calibrated from.

``swapvae train`` writes one (through a staging directory: training.staging); ``evaluate``,
``report`` and ``export`` reopen it with ``RunDir(path).load()``: the estimator, its session
and the split it was trained on. A run copied to another machine finds its recording again
with ``load(data=...)``, which refuses a file whose sha256 differs unless ``other_session``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swapvae.schemas import SwapVAEConfig
from swapvae.schemas.session import Session, Split, same_recording, source_of, split_session
from swapvae.training.data import NWB_OPTIONS, load_session
from swapvae.training.estimator import SwapVAE
from swapvae.training.readout import Readout

CONFIG, CHECKPOINT, HISTORY = "config.json", "checkpoint.pt", "history.json"
REFERENCE = "reference.npz"
READOUT, METRICS, SOURCE = "readout.json", "metrics.json", "run.json"
FIGURES_DIR = "figures"


def run_split(session: Session, cfg: SwapVAEConfig, validation: bool = False) -> Split:
    """The split a run trains and is scored on: the session's training and test trials, or with
    ``validation`` the same chronological rule inside its training trials (the first 80% of
    them train, the last 20% are scored: where choices are made, never on the test trials)."""
    if validation:
        session = split_session(session, cfg.data.train_fraction, cfg.data.static_std).train
    return split_session(session, cfg.data.train_fraction, cfg.data.static_std)


@dataclass(frozen=True)
class LoadedRun:
    estimator: SwapVAE
    session: Session
    split: Split

    @property
    def config(self) -> SwapVAEConfig:
        return self.estimator.config_


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @classmethod
    def create_shared(cls, path: str | Path, config: SwapVAEConfig, datas: list[str], sessions: list[str],
                      options: dict | None = None) -> RunDir:
        """A run directory for a model shared across the sessions ``datas``."""
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        run.save_config(config)
        source = {"shared": True, "sessions": [{**source_of(d), "session": s} for d, s in zip(datas, sessions)]}
        if options:
            source["options"] = dict(options)
        (run.path / SOURCE).write_text(json.dumps(source, indent=2))
        return run

    @property
    def validation(self) -> bool:
        """Whether this run was scored on a validation split of its training trials."""
        return (self.path / SOURCE).is_file() and self.source().get("split") == "validation"

    @property
    def shared(self) -> bool:
        """Whether this run holds a core shared across sessions (``swapvae train --shared``)."""
        return (self.path / SOURCE).is_file() and bool(self.source().get("shared"))

    def save_source(self, source: dict) -> None:
        (self.path / SOURCE).write_text(json.dumps(source, indent=2))

    def save_config(self, config: SwapVAEConfig) -> None:
        (self.path / CONFIG).write_text(config.model_dump_json(indent=2))

    def save_reference(self, rows) -> None:
        """The sessions' labelled training bins as latents (``training.readout.Labelled``)."""
        np.savez(self.path / REFERENCE, z=rows.z, copies=np.stack(rows.copies), trial=rows.trial, target=rows.target,
                 velocity=rows.velocity, moving=rows.moving)

    def reference(self):
        from swapvae.training.readout import Labelled

        with np.load(self._need(REFERENCE, "was it trained with --shared on labelled sessions?"),
                     allow_pickle=False) as f:
            return Labelled(f["z"], list(f["copies"]), f["trial"], f["target"], f["velocity"], f["moving"])

    @classmethod
    def create(cls, path: str | Path, config: SwapVAEConfig, data: str, session: str,
               options: dict | None = None, validation: bool = False) -> RunDir:
        """A run directory for ``config`` trained on ``data`` (read with the ``load_session``
        keywords ``options``; ``validation``: scored on its training trials, ``run_split``)."""
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        (run.path / CONFIG).write_text(config.model_dump_json(indent=2))
        source = {**source_of(data), "session": session}
        if validation:
            source["split"] = "validation"
        if options:
            source["options"] = dict(options)
        (run.path / SOURCE).write_text(json.dumps(source, indent=2))
        return run

    def require_labels(self, loaded: LoadedRun) -> None:
        """ValueError when this run has readouts (it was trained with reach labels) but the
        session it was loaded with has none, saying how an NWB file gets them."""
        if (self.path / READOUT).is_file() and not loaded.session.has_labels:
            raise ValueError(f"{loaded.session.name} has no reach labels (target, velocity), so the run's readouts "
                             f"cannot be scored on it; an NWB file is read with them by --target-column and "
                             f"--velocity-series")

    def _need(self, name: str, hint: str) -> Path:
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(f"{self.path}: no {name} ({hint})")
        return path

    # -- what a run holds -------------------------------------------------------------------------
    def estimator(self, device: str = "cpu") -> SwapVAE:
        return SwapVAE.load(self._need(CHECKPOINT, f"is {self.path} a training run directory?"), device)

    def save_history(self, history: list[dict]) -> None:
        (self.path / HISTORY).write_text(json.dumps(history))

    def readout(self, session: int | None = None) -> Readout:
        name = READOUT if session is None else f"readout-{session}.json"
        return Readout.from_json(json.loads(self._need(name, "was the run evaluated?").read_text()))

    def save_readout(self, readout: Readout, session: int | None = None) -> None:
        name = READOUT if session is None else f"readout-{session}.json"
        (self.path / name).write_text(json.dumps(readout.to_json()))

    def metrics(self) -> dict:
        path = self.path / METRICS
        return json.loads(path.read_text()) if path.is_file() else {}

    def save_metrics(self, metrics: dict) -> None:
        (self.path / METRICS).write_text(json.dumps(metrics, indent=2))

    def source(self) -> dict:
        """``{"data": ..., "data_sha256": ..., "session": ..., "options": {...}}``: what the run
        was trained on (``schemas.session.source_of``), and the ``load_session`` keywords it was
        read with (NWB files; absent otherwise)."""
        return json.loads(self._need(SOURCE, "pass the data explicitly").read_text())

    # -- reopening a run ------------------------------------------------------------------------
    def load(self, data: str | None = None, device: str = "cpu", options: dict | None = None,
             other_session: bool = False) -> LoadedRun:
        """The estimator, the session and the split the run's config makes of it. The session
        is the run's own recording, read from where run.json says or from ``data`` (the same
        file elsewhere: its sha256 must match), or another session when ``other_session``. An
        NWB file is read with the run's own NWB options, each replaced by one given in
        ``options``."""
        if self.shared:
            raise ValueError(f"{self.path} holds a core shared across {len(self.source()['sessions'])} sessions: "
                             f"metrics.json has each one's metrics; swapvae calibrate fits a new session onto it")
        est = self.estimator(device)
        saved = self.source() if data is None or (self.path / SOURCE).is_file() else {}
        data = same_recording(data, saved, f"the run {self.path}", other_session)
        options = {k: v for k, v in (options or {}).items() if v is not None}
        if str(data).endswith(".nwb"):
            options = {**{k: v for k, v in saved.get("options", {}).items() if k in NWB_OPTIONS}, **options}
        cfg = est.config_
        session = load_session(data, min_trials=cfg.data.min_trials, **options)
        if session.n_neurons != est.n_features_in_:
            raise ValueError(f"{data} has {session.n_neurons} channels but the run was trained on {est.n_features_in_}")
        if abs(session.bin_size_s - est.bin_size_s_) > 1e-9:
            raise ValueError(f"{data} has bins of {session.bin_size_s:g} s but the run was trained on bins of "
                             f"{est.bin_size_s_:g} s")
        return LoadedRun(est, session, run_split(session, cfg, saved.get("split") == "validation"))
