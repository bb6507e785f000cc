"""Ray Tune sweeps over loss weighting, sampling and freezing: search spaces and the sweep itself."""
