"""A binned recording (a ``Session``), its validation, its .npz file format and the paper's split.

Both sides read sessions: training fits on them, and the runtime's replay streams a session's
test bins through the service. So this module needs numpy alone, and a rig PC can replay a
recording without the training dependencies. The file format is described in docs/DATA.md;
``training.data.load_session`` is the front door that also builds the simulated and synthetic
sessions and reads NWB.

A session is spike counts per bin, the trial and position-in-trial of every bin, and
optionally the reach target (a direction class, constant inside a trial) and the hand
velocity. Swap-VAE itself needs only counts and trials; the reach readouts need the labels.
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REQUIRED = ("counts", "trial", "bin_in_trial")
LABELS = ("target", "velocity")


class DataError(ValueError):
    """A recording that cannot be used, with a message that names the problem."""


@dataclass(frozen=True)
class Session:
    counts: np.ndarray  # (n_bins, n_neurons) float32 non-negative integer spike counts
    trial: np.ndarray  # (n_bins,) trial id, trials contiguous and in chronological order
    bin_in_trial: np.ndarray  # (n_bins,)
    target: np.ndarray | None = None  # (n_bins,) reach direction class, constant inside a trial
    velocity: np.ndarray | None = None  # (n_bins, 2) hand velocity
    bin_size_s: float = 0.1
    name: str = "session"
    velocity_unit: str | None = None  # e.g. "cm/s", where the recording says (NWB does; a .npz may)

    @property
    def n_bins(self) -> int:
        return self.counts.shape[0]

    @property
    def n_neurons(self) -> int:
        return self.counts.shape[1]

    @property
    def trials(self) -> np.ndarray:
        return np.unique(self.trial)

    @property
    def has_labels(self) -> bool:
        """Whether the reach readouts can be fitted and scored (target and velocity known)."""
        return self.target is not None and self.velocity is not None

    @property
    def speed(self) -> np.ndarray:
        if self.velocity is None:
            raise DataError(f"{self.name}: no hand velocity in this session")
        return np.linalg.norm(self.velocity, axis=1)

    def select_bins(self, mask: np.ndarray) -> Session:
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        return replace(self, counts=self.counts[mask], trial=self.trial[mask], bin_in_trial=self.bin_in_trial[mask],
                       target=pick(self.target), velocity=pick(self.velocity))


def validate(arrays: dict[str, np.ndarray], name: str, min_trials: int = 4) -> Session:
    """Check a recording's arrays and build a Session; raise DataError naming the problem."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise DataError(f"{name}: missing array(s) {missing}; a session needs {list(REQUIRED)} "
                        f"(and {list(LABELS)} for the reach readouts)")
    partial = [k for k in LABELS if k not in arrays]
    if len(partial) == 1:
        raise DataError(f"{name}: has {[k for k in LABELS if k in arrays][0]!r} but no {partial[0]!r}; the reach "
                        f"readouts need both (or neither, to train without labels)")
    counts = np.asarray(arrays["counts"])
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise DataError(f"{name}: counts must be a non-empty 2-D (bins, neurons) array, got shape {counts.shape}")
    n = counts.shape[0]
    shapes = {"trial": (n,), "bin_in_trial": (n,), "target": (n,), "velocity": (n, 2)}
    for key, shape in shapes.items():
        if key in arrays and np.shape(arrays[key]) != shape:
            raise DataError(f"{name}: {key} has shape {np.shape(arrays[key])}, expected {shape} "
                            f"to match counts' {n} bins")
    _check_counts(counts, name)
    ints = {key: _integers(arrays[key], key, name) for key in ("trial", "bin_in_trial", "target") if key in arrays}
    trial = ints["trial"]
    back = np.flatnonzero(np.diff(trial) < 0)
    if back.size:  # the chronological split and the in-trial pairs rely on this order
        raise DataError(f"{name}: trial ids must not decrease along the bins (bins in chronological order, "
                        f"each trial contiguous); trial {trial[back[0]]} is followed by {trial[back[0] + 1]} "
                        f"at bin {back[0] + 1}")
    starts = np.flatnonzero(np.diff(trial) != 0) + 1
    n_trials = len(starts) + 1
    if n_trials < min_trials:
        raise DataError(f"{name}: only {n_trials} trial(s); at least {min_trials} are needed to split train/test")
    target = velocity = None
    if "target" in ints:
        target = ints["target"]
        for seg in np.split(np.arange(n), starts):
            if len(np.unique(target[seg])) != 1:
                raise DataError(f"{name}: target changes inside trial {trial[seg[0]]} "
                                f"(values {sorted(set(target[seg].tolist()))})")
        if (target < 0).any():
            raise DataError(f"{name}: target must be a direction class >= 0, found {target.min()}")
        velocity = np.asarray(arrays["velocity"], dtype=np.float64)
        if not np.isfinite(velocity).all():
            bad = int(np.argwhere(~np.isfinite(velocity))[0, 0])
            raise DataError(f"{name}: velocity contains NaN/inf at bin {bad}")
        velocity = velocity.astype(np.float32)
    bin_size = float(arrays["bin_size_s"]) if "bin_size_s" in arrays else 0.1
    if not (bin_size > 0 and np.isfinite(bin_size)):
        raise DataError(f"{name}: bin_size_s must be a positive number, got {bin_size}")
    unit = arrays.get("velocity_unit")
    unit = str(np.asarray(unit)) if unit is not None and np.asarray(unit).dtype.kind == "U" else None
    return Session(counts.astype(np.float32), trial, ints["bin_in_trial"], target, velocity, bin_size, name, unit)


def _check_counts(counts: np.ndarray, name: str) -> None:
    if not np.issubdtype(counts.dtype, np.number) or counts.dtype == np.bool_:
        raise DataError(f"{name}: counts must be numeric, got dtype {counts.dtype}")
    if np.issubdtype(counts.dtype, np.floating):
        bad = ~np.isfinite(counts)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise DataError(f"{name}: counts contain NaN/inf ({int(bad.sum())} entries, first at bin {r}, neuron {c})")
        frac = counts != np.round(counts)
        if frac.any():
            r, c = np.argwhere(frac)[0]
            raise DataError(f"{name}: counts must be integers, found {counts[r, c]} at bin {r}, neuron {c}")
    if (counts < 0).any():
        r, c = np.argwhere(counts < 0)[0]
        raise DataError(f"{name}: counts must be >= 0, found {counts[r, c]} at bin {r}, neuron {c}")


def _integers(a, key: str, name: str) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.integer):
        if not (np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() and (a == np.round(a)).all()):
            raise DataError(f"{name}: {key} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


# -- which recording: what a run or a bundle records of its data, and the check when it is read again
BUILT_IN = ("simulated", "synthetic")  # sessions built from a name, not read from a file


def is_file_source(data: str | Path) -> bool:
    """Whether ``data`` names a recording file (else a built-in session: simulated, synthetic)."""
    return str(data).split(":")[0] not in BUILT_IN


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_of(data: str | Path) -> dict:
    """What a run (run.json) and a bundle's manifest record of the data they were trained on:
    ``data``, the absolute path of a file (so the run is read the same from any folder) or the
    built-in session's name, and the file's ``data_sha256``."""
    if not is_file_source(data):
        return {"data": str(data), "data_sha256": None}
    path = Path(data).resolve()
    return {"data": str(path), "data_sha256": file_sha256(path)}


def same_recording(data: str | Path | None, recorded: dict, where: str, other_session: bool = False) -> str:
    """The recording to read for something trained on ``recorded`` (``source_of``'s keys):
    ``data`` if given (refused when it is a file whose sha256 differs, unless
    ``other_session``: then it is another session on purpose), else the recorded one (refused,
    naming --data, when its file is gone). ``where``: the run or bundle, for the messages."""
    saved, sha = recorded.get("data"), recorded.get("data_sha256")
    if data is None:
        if saved is None:
            raise DataError(f"{where} does not say which data it was trained on: pass --data")
        if is_file_source(saved) and not Path(saved).exists():
            raise DataError(f"{where} was trained on {saved}, which is not there (moved, or another machine?): "
                            f"pass --data FILE{f' (its sha256 must be {sha[:16]}...)' if sha else ''}")
        data = saved
    elif other_session:
        return str(data)
    if sha is not None and is_file_source(data):
        if not Path(data).exists():
            raise DataError(f"{data}: no such file")
        if (got := file_sha256(data)) != sha:
            raise DataError(f"{data} is not the recording {where} was trained on (sha256 {got[:16]}..., the run "
                            f"recorded {sha[:16]}...): pass --other-session to use another session on purpose")
    elif saved is not None and data != saved and not (is_file_source(data) and is_file_source(saved)):
        raise DataError(f"{data} is not the data {where} was trained on ({saved}): pass --other-session to use "
                        f"another session on purpose")
    return str(data)


def read_npz(path: str | Path, min_trials: int = 4) -> Session:
    """A session from a .npz file (docs/DATA.md); never unpickles."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:  # object arrays would need pickle: never for an untrusted file
        if not zipfile.is_zipfile(path):  # numpy reads a file that is no zip archive as a pickle
            raise DataError(f"{path}: not a .npz file (a .npz is a zip archive of arrays; docs/DATA.md)") from None
        raise DataError(f"{path}: cannot read without unpickling ({e})") from None
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    return validate(arrays, path.stem, min_trials)


def write_npz(session: Session, path: str | Path) -> Path:
    """``session`` as a .npz file that ``read_npz`` reads back (labels only if it has them)."""
    arrays = {"counts": session.counts, "trial": session.trial, "bin_in_trial": session.bin_in_trial,
              "bin_size_s": np.float64(session.bin_size_s)}
    if session.has_labels:
        arrays.update(target=session.target, velocity=session.velocity)
        if session.velocity_unit:
            arrays["velocity_unit"] = np.array(session.velocity_unit)
    np.savez(path, **arrays)
    return Path(path)


@dataclass(frozen=True)
class Split:
    train: Session
    test: Session
    neurons: np.ndarray  # recording columns the model keeps (fitted on train); sessions keep all


def split_session(session: Session, train_fraction: float = 0.8, static_std: float = 1e-3) -> Split:
    """The paper's split: first ``train_fraction`` of trials (chronological) train, the rest test;
    neurons whose std over the training bins is <= ``static_std`` are dropped from both."""
    trials = session.trials  # trial ids are chronological
    n_train = int(round(train_fraction * len(trials)))
    if not 0 < n_train < len(trials):
        raise DataError(f"{session.name}: {len(trials)} trials cannot be split {train_fraction:.0%} / rest")
    is_train = np.isin(session.trial, trials[:n_train])
    train, test = session.select_bins(is_train), session.select_bins(~is_train)
    keep = static_filter(train.counts, static_std)
    if keep.size == 0:
        raise DataError(f"{session.name}: every neuron is static over the training bins")
    return Split(train, test, keep)


def static_filter(counts: np.ndarray, static_std: float) -> np.ndarray:
    """Indices of the channels whose std over ``counts`` exceeds ``static_std``."""
    return np.flatnonzero(counts.std(axis=0) > static_std)
