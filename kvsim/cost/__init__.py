"""Cost model: per-operator roofline with calibrated efficiencies (see model.py, calibration.py)."""

from kvsim.cost.calibration import Calibration, find_calibration
from kvsim.cost.model import Batch, CostModel, Op, StepCost

__all__ = ["Batch", "Calibration", "CostModel", "Op", "StepCost", "find_calibration"]
