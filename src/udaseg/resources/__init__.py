"""Packaged data files (the demo's SynthNight source model)."""
