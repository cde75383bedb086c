"""Calibration: full-model trajectories from random noise and labels, and the blended
forward that cache learners (Learning-to-Cache routers, TokenCache's predictor) train on."""
from tcgraph.calibrate.mixed import mixed_step
from tcgraph.calibrate.trajectories import Trajectories, branch_bytes, calibrate, calibration_bytes

__all__ = ["Trajectories", "branch_bytes", "calibrate", "calibration_bytes", "mixed_step"]
