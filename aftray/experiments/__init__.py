"""Experiments over many runs: the compute-matched loss comparison and its results page."""
