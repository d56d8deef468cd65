"""Packaged data files (the demo's SynthNight source model, the BDD100K night list)."""
