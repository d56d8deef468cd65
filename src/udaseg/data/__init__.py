"""Datasets, transforms, label sets and the SynthNight generator (imports nothing from models/adapt)."""
