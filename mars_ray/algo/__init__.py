"""MARS algorithm, pure numpy/torch (no Ray, no file I/O): one function per paper equation."""

from mars_ray.algo.centroids import (
    BackgroundMean,
    Selection,
    bias_distance,
    bias_distance_naive,
    class_means,
    class_sums,
    means_from_sums,
    select_debiased_centroids,
    top_alpha_mask,
)
from mars_ray.algo.clustering import RegionClusters, cluster_regions, kmeans
from mars_ray.algo.complement import certain_mask, complement_labels, ema_update, weighted_cross_entropy
from mars_ray.algo.crf import dense_crf
from mars_ray.algo.debias import activation_map, binarize_activation, debias_label
from mars_ray.algo.metrics import ConfusionMatrix, map_biased, summarize

__all__ = [
    "BackgroundMean", "ConfusionMatrix", "RegionClusters", "Selection",
    "activation_map", "bias_distance", "bias_distance_naive", "binarize_activation", "certain_mask",
    "class_means", "class_sums", "cluster_regions", "complement_labels", "debias_label", "dense_crf",
    "ema_update", "kmeans", "map_biased", "means_from_sums", "select_debiased_centroids", "summarize",
    "top_alpha_mask", "weighted_cross_entropy",
]
