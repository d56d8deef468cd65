"""Datasets in their real on-disk layouts (SynthNight is read through the same loaders).

Import the loaders from their modules (``udaseg.data.datasets.acdc`` ...) or by catalogue name
(:data:`udaseg.catalog.DATASETS`); only the two SynthNight uses are re-exported here, so that
importing the package stays cheap (DSEC pulls h5py).
"""

from .base import Record, SegmentationDataset
from .cityscapes import Cityscapes
from .dark_zurich import DarkZurich

__all__ = ["Cityscapes", "DarkZurich", "Record", "SegmentationDataset"]
