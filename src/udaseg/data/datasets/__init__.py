"""Datasets in their real on-disk layouts (SynthNight is read through the same loaders)."""

from .base import Record, SegmentationDataset
from .cityscapes import Cityscapes
from .dark_zurich import DarkZurich

__all__ = ["Record", "SegmentationDataset", "Cityscapes", "DarkZurich"]
