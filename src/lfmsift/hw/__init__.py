"""An open simulator of the V-Rex accelerator and its GPU baselines (specs, event model, energy, fit)."""
