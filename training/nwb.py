"""NWB input: a ``Session`` from an NWB file's units table, trials table and a velocity series.

    load_session("rec.nwb", target_column="target", velocity_series="hand_velocity")   # training.data

The file is opened read-only with pynwb's ``NWBHDF5IO`` (nothing is unpickled). What is read
(docs/DATA.md has the same, beside the .npz format):

- **units**: every row of the units table is one channel, in row order; its ``spike_times``
  are counted into the bins below. Spikes outside every trial's bins are not counted.
- **trials**: ``start_time`` and ``stop_time`` of the trials table, sorted by start. Trials must
  not overlap (one may start where the last stopped). The session's trial ids are their
  positions in that order: 0, 1, 2, ...
- **bins**, of ``bin_size_s`` (b), inside each trial from its start: bin k of the trial
  [start, stop) is [start + k b, start + (k + 1) b). A bin that does not fit completely before
  stop is dropped, and so is a trial shorter than one bin (its id is then missing from the
  session). A spike at time t goes to bin floor((t - start) / b) of the trial it falls in.
  Times within ``TOL`` of a bin (1e-6 b: 0.1 us at 100 ms, far below any clock's resolution)
  of an edge count as on it, so float rounding of times such as 12.3 + 0.1 k cannot move a
  spike or drop a bin.
- **target** (optional, ``target_column``): a trials-table column with the reach direction
  class of each trial (integers >= 0), repeated over the trial's bins.
- **velocity** (optional, ``velocity_series``): a TimeSeries of shape (samples, 2), found by
  name among the data interfaces of the processing modules (also inside containers such as
  BehavioralTimeSeries) and in acquisition; a path suffix ("behavior/hand_velocity") picks one
  of several. Its values (``data * conversion + offset``, in the series' unit: the readout's
  speed threshold is in that unit) are linearly interpolated at every bin centre, from its
  timestamps or from starting_time and rate; each centre must lie inside the series' span.

Target and velocity come together (the reach readouts need both) or not at all: counts and
trials alone make a label-free session, which trains and exports latents and rates only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from swapvae.schemas.session import DataError, Session, validate

TOL = 1e-6  # of a bin: how close to a bin edge a time counts as on it


def read_nwb(path: str | Path, *, bin_size_s: float = 0.1, target_column: str | None = None,
             velocity_series: str | None = None, min_trials: int = 4) -> Session:
    """The session of an NWB file (the module docstring says what is read); DataError naming
    the problem for a file that cannot give one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if not (np.isfinite(bin_size_s) and bin_size_s > 0):
        raise DataError(f"{path}: the bin size must be a positive number of seconds, got {bin_size_s}")
    if (target_column is None) != (velocity_series is None):
        raise DataError(f"{path}: the target column (--target-column) and the velocity series (--velocity-series) "
                        f"go together: the reach readouts need both; give neither to train without labels")
    from pynwb import NWBHDF5IO

    try:
        io = NWBHDF5IO(str(path), mode="r")
    except Exception as e:  # not HDF5, or not NWB: h5py and hdmf raise several kinds
        raise DataError(f"{path}: not a readable NWB file ({type(e).__name__}: {e})") from None
    with io:
        try:
            nwb = io.read()
        except Exception as e:
            raise DataError(f"{path}: not a readable NWB file ({type(e).__name__}: {e})") from None
        arrays = session_arrays(nwb, str(path), float(bin_size_s), target_column, velocity_series)
    return validate(arrays, path.stem, min_trials)


def session_arrays(nwb, where: str, bin_size_s: float, target_column: str | None,
                   velocity_series: str | None) -> dict[str, np.ndarray]:
    """The session's arrays (``schemas.session.validate``'s input) from an open NWBFile."""
    starts, stops, rows = trial_times(nwb, where, bin_size_s)
    n_bins = np.floor((stops - starts) / bin_size_s + TOL).astype(np.int64)
    kept = np.flatnonzero(n_bins > 0)
    if kept.size == 0:
        raise DataError(f"{where}: no trial is as long as one bin ({bin_size_s:g} s)")
    starts, n_bins = starts[kept], n_bins[kept]
    bin_in_trial = np.arange(n_bins.sum()) - np.repeat(np.cumsum(n_bins) - n_bins, n_bins)
    times, unit, n_units = spike_times(nwb, where)
    arrays = {"counts": bin_spikes(times, unit, n_units, starts, n_bins, bin_size_s),
              "trial": np.repeat(kept, n_bins), "bin_in_trial": bin_in_trial, "bin_size_s": np.float64(bin_size_s)}
    if target_column is not None:
        arrays["target"] = np.repeat(trial_column(nwb, where, target_column)[rows][kept], n_bins)
        centres = np.repeat(starts, n_bins) + (bin_in_trial + 0.5) * bin_size_s
        found = find_series(nwb, where, velocity_series)
        arrays["velocity"] = sample_series(found, centres, bin_size_s)
        unit = getattr(found[1], "unit", None)
        if unit and unit != "unknown":
            arrays["velocity_unit"] = np.array(str(unit))
    return arrays


def trial_times(nwb, where: str, bin_size_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, stop, row in the trials table) of every trial, in chronological order."""
    trials = nwb.trials
    if trials is None:
        raise DataError(f"{where}: no trials table (intervals/trials): bins are made inside trials")
    if len(trials) == 0:
        raise DataError(f"{where}: the trials table is empty")
    ids = np.asarray(trials.id.data[:])
    starts = np.asarray(trials["start_time"].data[:], dtype=np.float64)
    stops = np.asarray(trials["stop_time"].data[:], dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(starts) & np.isfinite(stops) & (stops > starts)))
    if bad.size:
        i = bad[0]
        raise DataError(f"{where}: trial id {ids[i]} has start_time {starts[i]} and stop_time {stops[i]}; "
                        f"a trial needs finite times with stop > start")
    rows = np.argsort(starts, kind="stable")
    starts, stops = starts[rows], stops[rows]
    overlap = np.flatnonzero(starts[1:] < stops[:-1] - TOL * bin_size_s)
    if overlap.size:
        i = overlap[0]
        raise DataError(f"{where}: trials overlap: trial id {ids[rows[i]]} [{starts[i]:.6g}, {stops[i]:.6g}) s and "
                        f"trial id {ids[rows[i + 1]]} [{starts[i + 1]:.6g}, {stops[i + 1]:.6g}) s; every bin must "
                        f"belong to one trial")
    return starts, stops, rows


def spike_times(nwb, where: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(every spike time, its unit's row, number of units) of the units table."""
    units = nwb.units
    if units is None:
        raise DataError(f"{where}: no units table: the spike times of each unit are read from it")
    if len(units) == 0:
        raise DataError(f"{where}: the units table is empty: no unit to count spikes of")
    if "spike_times" not in units.colnames:
        raise DataError(f"{where}: the units table has no spike_times column (columns: {list(units.colnames)})")
    index = units["spike_times"]  # a ragged column: flat times and the end of each unit's run
    ends = np.asarray(index.data[:], dtype=np.int64)
    times = np.asarray(index.target.data[:], dtype=np.float64)
    unit = np.repeat(np.arange(len(ends)), np.diff(np.r_[0, ends]))
    bad = np.flatnonzero(~np.isfinite(times))
    if bad.size:
        raise DataError(f"{where}: unit {units.id.data[unit[bad[0]]]} has a non-finite spike time ({times[bad[0]]})")
    return times, unit, len(ends)


def bin_spikes(times: np.ndarray, unit: np.ndarray, n_units: int, starts: np.ndarray, n_bins: np.ndarray,
               bin_size_s: float) -> np.ndarray:
    """Spike counts (bins, units) over the trials' bins, trial after trial: a spike at ``t`` in
    the trial starting at ``starts[j]`` goes to its bin floor((t - start) / b), if that bin is
    one of the trial's ``n_bins[j]``. Trials are sorted and do not overlap."""
    tol = TOL * bin_size_s
    j = np.searchsorted(starts - tol, times, side="right") - 1  # the last trial starting at or before t
    after = j >= 0
    j, t, u = j[after], times[after], unit[after]
    k = np.floor((t - starts[j]) / bin_size_s + TOL).astype(np.int64)
    inside = k < n_bins[j]
    rows = (np.cumsum(n_bins) - n_bins)[j[inside]] + k[inside]
    total = int(n_bins.sum())
    return np.bincount(rows * n_units + u[inside], minlength=total * n_units).reshape(total, n_units)


def trial_column(nwb, where: str, column: str) -> np.ndarray:
    """A trials-table column of direction classes, one integer per row."""
    trials = nwb.trials
    if column not in trials.colnames:
        raise DataError(f"{where}: the trials table has no column {column!r} (--target-column); its columns: "
                        f"{[c for c in trials.colnames if c not in ('start_time', 'stop_time')]}")
    values = np.asarray(trials[column].data[:])
    if values.ndim != 1 or values.dtype.kind not in "iuf":
        raise DataError(f"{where}: trials column {column!r} holds {values.dtype} values of shape {values.shape}; "
                        f"the target is the reach direction class of each trial, one integer >= 0")
    bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)) | (values < 0))
    if bad.size:
        raise DataError(f"{where}: trials column {column!r} has {values[bad[0]]} for trial id "
                        f"{trials.id.data[bad[0]]}; the target must be a direction class, an integer >= 0")
    return values.astype(np.int64)


def find_series(nwb, where: str, name: str):
    """``(path, TimeSeries)`` of the one series called ``name`` (or ending in the path ``name``)
    among the processing modules' data interfaces, the series inside them, and acquisition."""
    from pynwb import TimeSeries

    groups = [(f"processing/{m}", module.data_interfaces) for m, module in nwb.processing.items()]
    groups.append(("acquisition", nwb.acquisition))
    seen, found = [], []
    for place, objects in groups:
        for key, obj in objects.items():
            inside = [(f"{place}/{key}", obj)] if isinstance(obj, TimeSeries) else [
                (f"{place}/{key}/{c.name}", c) for c in getattr(obj, "children", ()) if isinstance(c, TimeSeries)]
            for series_path, series in inside:
                seen.append(series_path)
                if series_path == name or series_path.endswith("/" + name.strip("/")):
                    found.append((series_path, series))
    if not found:
        raise DataError(f"{where}: no time series {name!r} (--velocity-series) in the processing modules or "
                        f"acquisition; the time series there: {seen or 'none'}")
    if len(found) > 1:
        raise DataError(f"{where}: {len(found)} time series match {name!r}: {[p for p, _ in found]}; "
                        f"name one by its path, e.g. {found[0][0].split('/', 1)[1]!r}")
    return found[0]


def sample_series(found, centres: np.ndarray, bin_size_s: float) -> np.ndarray:
    """The series (``(path, TimeSeries)``) interpolated linearly at ``centres``: (n, 2)."""
    path, series = found
    data = np.asarray(series.data[:], dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != 2:
        raise DataError(f"{path} has shape {data.shape}; the hand velocity must be (samples, 2): x and y")
    data = data * float(series.conversion) + float(getattr(series, "offset", 0.0) or 0.0)
    if series.timestamps is not None:
        t = np.asarray(series.timestamps[:], dtype=np.float64)
    else:
        t = float(series.starting_time or 0.0) + np.arange(len(data)) / float(series.rate)
    if len(t) != len(data) or len(t) == 0:
        raise DataError(f"{path}: {len(t)} timestamps for {len(data)} samples")
    if not (np.isfinite(t).all() and (np.diff(t) > 0).all()):
        raise DataError(f"{path}: its timestamps must be finite and increasing")
    tol = TOL * bin_size_s
    outside = np.flatnonzero((centres < t[0] - tol) | (centres > t[-1] + tol))
    if outside.size:
        raise DataError(f"{path} spans [{t[0]:.6g}, {t[-1]:.6g}] s, but {outside.size} bin centre(s) lie outside it "
                        f"(the first at {centres[outside[0]]:.6g} s): the velocity is sampled at every bin centre")
    velocity = np.column_stack([np.interp(centres, t, data[:, i]) for i in range(2)])
    bad = np.flatnonzero(~np.isfinite(velocity).all(axis=1))
    if bad.size:
        raise DataError(f"{path}: NaN/inf in the velocity around {centres[bad[0]]:.6g} s "
                        f"({bad.size} bin(s) affected)")
    return velocity
