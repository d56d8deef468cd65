"""SynthNight: an embedded procedural day-to-night benchmark for UDA semantic segmentation.

A seeded generator of perspective street scenes with per-pixel Cityscapes train-ID labels,
rendered by day (source domain, Cityscapes layout) and by night (target domain, Dark Zurich
layout), with misaligned day references, Depth-Anything-style depth maps and DSEC-layout event
streams for the night frames. The scene model is described in :mod:`.scene`, the day/night imaging
model in :mod:`.render`, the event model in :mod:`.events` and the on-disk layout in :mod:`.writer`.

Example::

    from udaseg.data.synthnight import generate, SynthNightConfig
    root = generate("data/synthnight", SynthNightConfig(seed=0))
"""

from .events import EventSimConfig, EventStream, read_events_h5
from .render import DayStyle, NightParams, NightStyle
from .writer import (
    GENERATOR_VERSION,
    SPLITS,
    SynthNightConfig,
    SynthNightSample,
    generate,
    make_sample,
    sample_paths,
)

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "DayStyle",
    "EventSimConfig",
    "EventStream",
    "NightParams",
    "NightStyle",
    "SynthNightConfig",
    "SynthNightSample",
    "generate",
    "make_sample",
    "read_events_h5",
    "sample_paths",
]
