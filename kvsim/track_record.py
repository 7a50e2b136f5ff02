"""kvsim's track record: how far its serving predictions were from real engines' measurements.

Every serving answer says how wrong kvsim has been before on the nearest thing it was judged on: the
same model with its weights in the same precision on the same GPU and engine, else the same GPU and
engine over every model judged there, else that no public run of that GPU and engine was judged. The
figures are the serving judge's (``kvsim validate --serving aiconfigurator``: every expressible run of
aiconfigurator's public silicon sample, the aiconfigurator deployment), written to
``kvsim/data/judged_accuracy.yaml`` by ``scripts/judged_accuracy.py`` with the commit they were judged
at. They describe those benchmark runs (closed loops of up to 512 clients, fixed prompt and output
lengths, each engine's release of the day), not a bound on any other workload; nothing is fitted to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from kvsim.fileio import load_data_file

FILE = "kvsim/data/judged_accuracy.yaml"


@dataclass(frozen=True)
class TrackRecord:
    """kvsim's error on one group of judged runs: (predicted - measured) / measured, median of the
    absolute values and of the signed ones (positive: kvsim slower than measured)."""

    gpu: str
    engine: str
    model: str  # catalogue model (or release name); "" for every model of the GPU and engine
    weights: str  # the precision its weights were served in (a run summary's scenario.weights); "" with model ""
    runs: int
    tpot_median_abs: float
    tpot_median_signed: float
    ttft_median_abs: float
    ttft_median_signed: float

    def describe(self) -> str:
        what = f"{self.model} ({self.weights} weights) on {self.gpu} with {self.engine}" if self.model else (
            f"{self.gpu} with {self.engine} (every model judged there)")
        return (f"judged on {self.runs:,} public closed-loop runs of {what}: TPOT median error "
                f"{self.tpot_median_abs:.1%} (signed {self.tpot_median_signed:+.1%}), TTFT "
                f"{self.ttft_median_abs:.1%} (signed {self.ttft_median_signed:+.1%})")


@dataclass(frozen=True)
class Records:
    commit: str  # the kvsim commit the runs were judged at
    date: str
    source: str  # what was judged, in words
    groups: tuple[TrackRecord, ...]

    def find(self, gpu: str, engine: str, model: str, weights: str) -> TrackRecord | None:
        """The record of this model served in these weights on this GPU and engine, else the GPU and
        engine's over every model judged there, else None."""
        by_key = {(r.gpu, r.engine, r.model, r.weights): r for r in self.groups}
        return by_key.get((gpu, engine, model, weights)) or by_key.get((gpu, engine, "", ""))

    def note(self, gpu: str, engine: str, model: str, weights: str) -> str:
        """The line a serving answer carries about kvsim's record for it."""
        r = self.find(gpu, engine, model, weights)
        where = f"(kvsim {self.commit}, {self.date}; {FILE})"
        if r is None:
            return (f"no public end-to-end run of {engine} on {gpu} has been judged, so this answer's error "
                    f"against a real engine is unknown {where}")
        return f"{r.describe()} {where}"

    def entry(self, gpu: str, engine: str, model: str, weights: str) -> dict:
        """A run summary's ``track_record``: the note, and the group's figures (None where none was judged)."""
        r = self.find(gpu, engine, model, weights)
        figures = {k: getattr(r, k) if r else None for k in ("model", "weights", "runs", "tpot_median_abs",
                                                              "tpot_median_signed", "ttft_median_abs",
                                                              "ttft_median_signed")}
        return {"note": self.note(gpu, engine, model, weights), "gpu": gpu, "engine": engine, **figures}


@cache
def records() -> Records:
    data = load_data_file(FILE)
    return Records(str(data["commit"]), str(data["date"]), str(data["source"]),
                   tuple(TrackRecord(**g) for g in data["groups"]))
