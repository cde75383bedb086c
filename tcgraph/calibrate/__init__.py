"""Calibration: full-model trajectories from random noise and labels, and the blended forward that
cache learners (Learning-to-Cache routers, TokenCache's predictor) train on; the output Grams that
forecast weights are fitted from, computed in the same pass."""
from tcgraph.calibrate.grams import Grams, add_grams, stack_outputs
from tcgraph.calibrate.mixed import Rows, mixed_step
from tcgraph.calibrate.trajectories import (
    Trajectories,
    branch_bytes,
    calibrate,
    calibration_bytes,
    calibration_chunks,
)

__all__ = ["Grams", "Rows", "Trajectories", "add_grams", "branch_bytes", "calibrate", "calibration_bytes",
           "calibration_chunks", "mixed_step", "stack_outputs"]
