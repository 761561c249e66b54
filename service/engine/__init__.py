"""The scoring engine: rendering, scheduling, running the PRM, post-processing. It knows nothing about HTTP."""
