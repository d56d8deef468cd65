"""udaseg: unsupervised domain adaptation of semantic segmentation to adverse conditions."""

__version__ = "0.1.0"
