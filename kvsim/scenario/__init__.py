"""Scenarios: a YAML description of one deployment and workload, run by the serving simulator.

Public API (``kvsim sweep`` builds on it):

* :func:`scenario_from_dict` validates a raw mapping; :func:`load_scenario` reads YAML and
  applies ``--set`` overrides (:func:`apply_override`); a top-level ``sweep:`` is kept aside;
* :func:`run_scenario` simulates and returns a :class:`RunResult` whose ``summary`` is JSON-able
  and deterministic for a seed; :func:`write_outputs` writes the run's files.
"""

from kvsim.scenario.load import Scenario, apply_override, load_scenario, scenario_from_dict
from kvsim.scenario.outputs import write_outputs
from kvsim.scenario.run import RunResult, run_scenario

__all__ = ["RunResult", "Scenario", "apply_override", "load_scenario", "run_scenario", "scenario_from_dict",
           "write_outputs"]
