"""Clustering: mean shift with scikit-learn's semantics (jitted, blocked, shardable over points),
image segmentation with it, and cluster purity against known classes. docs/clustering.md."""

from llmjax.cluster.meanshift import (KERNELS, ClusterError, bin_seeds, estimate_bandwidth,
                                      mean_shift, purity)
from llmjax.cluster.segment import Segmentation, pixel_features, segment_image

__all__ = ["KERNELS", "ClusterError", "Segmentation", "bin_seeds", "estimate_bandwidth",
           "mean_shift", "pixel_features", "purity", "segment_image"]
