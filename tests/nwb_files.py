"""Test data: small NWB files written with pynwb, and any binned session turned into one.

``session_to_nwb`` is the converter of the NWB bar test (Chewie-1 as NWB): trial k spans
[first bin start, last bin end), its bins contiguous, consecutive trials ``gap_s`` apart (with
one stray spike per unit in each gap, which the reader must not count); a bin's count c
becomes c spike times spread evenly inside it, at (j + 1/2) / c of the bin (deterministic,
never on an edge); the target is a trials column ``target``; the velocity is a TimeSeries
``hand_velocity`` in the processing module ``behavior``, its timestamps at the bin centres.
Reading it back with bins of the session's size gives the session's arrays.
"""
from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pynwb import NWBHDF5IO, NWBFile, TimeSeries
from pynwb.behavior import BehavioralTimeSeries


def new_file() -> NWBFile:
    return NWBFile(session_description="swapvae-bci test data", identifier="swapvae-test",
                   session_start_time=datetime(2013, 10, 3, tzinfo=UTC))


def write_nwb(path: str | Path, spikes: list[np.ndarray] | None, trials: list[tuple[float, float]] | None, *,
              target: list | None = None, target_column: str = "target", velocity: np.ndarray | None = None,
              timestamps: np.ndarray | None = None, rate: float | None = None, starting_time: float = 0.0,
              conversion: float = 1.0, series_name: str = "hand_velocity", place: str = "behavior") -> Path:
    """An NWB file with these units (spike times per unit; None: no units table), trials
    ([start, stop) pairs; None: no trials table), a trials column and a velocity series.
    ``place``: "behavior" (a processing module), "container" (a BehavioralTimeSeries in it)
    or "acquisition"."""
    nwb = new_file()
    for times in spikes or []:
        nwb.add_unit(spike_times=np.asarray(times, dtype=np.float64))
    if trials is not None:
        if target is not None:
            nwb.add_trial_column(target_column, "reach direction class")
        for i, (start, stop) in enumerate(trials):
            label = {target_column: target[i]} if target is not None else {}
            nwb.add_trial(start_time=float(start), stop_time=float(stop), **label)
    if velocity is not None:
        timing = ({"timestamps": timestamps} if timestamps is not None
                  else {"rate": rate, "starting_time": starting_time})
        series = TimeSeries(name=series_name, data=velocity, unit="cm/s", conversion=conversion, **timing)
        if place == "acquisition":
            nwb.add_acquisition(series)
        else:
            module = nwb.create_processing_module("behavior", "hand kinematics")
            module.add(BehavioralTimeSeries(time_series=series, name="kinematics") if place == "container" else series)
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return Path(path)


def session_to_nwb(session, path: str | Path, gap_s: float = 0.5, t0: float = 1.0) -> Path:
    """``session`` (schemas.session.Session, bins contiguous from 0 in each trial) as an NWB
    file, as the module docstring describes."""
    b = session.bin_size_s
    trial_ids = session.trials
    first = np.searchsorted(session.trial, trial_ids)
    lengths = np.diff(np.r_[first, session.n_bins])
    assert all((session.bin_in_trial[f:f + n] == np.arange(n)).all() for f, n in zip(first, lengths))
    starts = t0 + np.r_[0.0, np.cumsum(lengths[:-1] * b + gap_s)]
    stops = starts + lengths * b
    bin_start = np.repeat(starts, lengths) + session.bin_in_trial * b
    counts = np.asarray(session.counts).astype(np.int64)
    gaps = (stops[:-1] + starts[1:]) / 2
    spikes = []
    for unit in range(session.n_neurons):
        c = counts[:, unit]
        rows = np.repeat(np.arange(session.n_bins), c)
        j = np.arange(len(rows)) - np.repeat(np.cumsum(c) - c, c)  # spike j of its bin
        spikes.append(np.sort(np.r_[bin_start[rows] + (j + 0.5) / c[rows] * b, gaps]))
    velocity = centres = None
    if session.has_labels:
        centres = np.repeat(starts, lengths) + (session.bin_in_trial + 0.5) * b
        velocity = session.velocity
    target = [int(session.target[f]) for f in first] if session.has_labels else None
    return write_nwb(path, spikes, list(zip(starts, stops)), target=target, velocity=velocity, timestamps=centres)
