"""A sweep's SPEC (``swapvae sweep SPEC --out DIR``): sessions, seeds, a search space over
``SwapVAEConfig`` fields and each trial's share of a machine.

    sessions: [simulated, {data: day2.nwb, target_column: direction, velocity_series: hand}]
    seeds: [0, 1]
    config: {optim: {epochs: 100}}       # the base every trial starts from
    grid:                                # every combination (or optuna: a budget of trials)
      optim.epochs: [3, 6]
    resources: {cpus: 1, gpus: 0.25}

A trial is one session, one point of the space and one seed. Every key of the space is a field
of ``SwapVAEConfig`` named by its dotted path, and every value is checked against the config
when the SPEC is read, so a typo fails before anything trains. A session's relative path in a
SPEC file is read from that file's folder (the SPEC means the same from any working folder).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swapvae.schemas.config import SwapVAEConfig
from swapvae.schemas.session import is_file_source

# Scores a sweep can choose by, each larger-is-better, on the validation split's metrics.json.
METRICS = {"reach_acc+delta": ("reach_acc", "reach_delta_acc"), "velocity_r2": ("velocity_r2",),
           "bits_per_spike": ("bits_per_spike",)}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SessionSpec(_Spec):
    """A recording and how an NWB file is read (``swapvae train``'s NWB options)."""
    data: str = Field(min_length=1)
    bin_size_s: float | None = Field(None, gt=0)
    target_column: str | None = None
    velocity_series: str | None = None

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"data"}).items() if v is not None}


class Resources(_Spec):
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class Range(_Spec):
    """One dimension of an Optuna search: ``choices``, or a number in [low, high] (``log``:
    sampled on a log scale; ``integer``: whole numbers)."""
    choices: list[Any] | None = Field(None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> Range:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("a search dimension has either choices or both low and high")
        if self.low is not None and not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")
        return self

    def values(self) -> list[Any]:
        """The values to check against the config: the choices, or the two ends."""
        ends = [self.low, self.high]
        return list(self.choices) if self.choices is not None else [int(v) for v in ends] if self.integer else ends


class Optuna(_Spec):
    """Optuna's TPE sampler over ``space``: ``trials`` points, each run on every session and seed."""
    trials: int = Field(ge=1)
    space: dict[str, Range] = Field(min_length=1)


def nested(path: str, value: Any) -> dict[str, Any]:
    """``{"optim": {"epochs": 3}}`` from ``"optim.epochs"`` and 3."""
    head, _, rest = path.partition(".")
    return {head: nested(rest, value) if rest else value}


def check_field(path: str, values: list[Any]) -> None:
    """ValueError unless ``path`` names a field of SwapVAEConfig that takes each of ``values``."""
    if path == "seed":
        raise ValueError("'seed' is not searched: list them under seeds")
    section, _, field = path.partition(".")
    fields = SwapVAEConfig.model_fields
    if section not in fields:
        raise ValueError(f"'{path}' is not a config field (sections and fields: {', '.join(fields)})")
    sub = getattr(fields[section].annotation, "model_fields", None)
    if (sub is None) != (not field) or (sub is not None and field not in sub):
        known = ", ".join(f"{section}.{k}" for k in sub) if sub else section
        raise ValueError(f"'{path}' is not a config field (in {section}: {known})")
    if not values:
        raise ValueError(f"'{path}' has no values to search")
    for v in values:
        try:
            SwapVAEConfig().with_overrides(**nested(path, v))
        except ValidationError as e:
            raise ValueError(f"'{path}' = {v!r}: {e.errors()[0]['msg']}") from None


class SweepSpec(_Spec):
    sessions: list[str | SessionSpec] = Field(min_length=1)
    seeds: list[int] = Field([0], min_length=1)
    config: dict[str, Any] = Field(default_factory=dict, description="the base config's fields, as in --config")
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    optuna: Optuna | None = None
    metric: Literal["reach_acc+delta", "velocity_r2", "bits_per_spike"] = "reach_acc+delta"
    resources: Resources = Resources()

    @field_validator("sessions")
    @classmethod
    def _as_specs(cls, v: list) -> list[SessionSpec]:
        return [SessionSpec(data=s) if isinstance(s, str) else s for s in v]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v

    @model_validator(mode="after")
    def _space(self) -> SweepSpec:
        try:
            SwapVAEConfig.model_validate(self.config)
        except ValidationError as e:
            raise ValueError(f"config: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from None
        if self.grid and self.optuna:
            raise ValueError("give a grid or an optuna search, not both")
        for path, values in self.grid.items():
            check_field(path, values)
        for path, dim in (self.optuna.space.items() if self.optuna else ()):
            check_field(path, dim.values())
        names = [Path(s.data).stem for s in self.sessions]
        if len(set(names)) != len(names):
            raise ValueError(f"two sessions with one name ({names}): a trial's folder is named by its session")
        return self

    def session_names(self) -> list[str]:
        return [Path(s.data).stem for s in self.sessions]

    @classmethod
    def from_file(cls, path: str | Path) -> SweepSpec:
        """A SPEC from a YAML (.yaml, .yml; needs PyYAML, which the [sweep] extra has) or JSON file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                raw = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(f"sweep spec {path}: not valid YAML ({e})") from None
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"sweep spec {path}: not valid JSON ({e})") from None
        try:
            spec = cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"sweep spec {path}: {where + ': ' if where else ''}{err['msg']}") from None
        here = path.resolve().parent
        return spec.model_copy(update={"sessions": [
            s.model_copy(update={"data": os.path.normpath(here / s.data)})
            if is_file_source(s.data) and not Path(s.data).is_absolute() else s for s in spec.sessions]})
