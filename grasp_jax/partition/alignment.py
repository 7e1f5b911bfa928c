"""Clusters of classes whose gradients agree: the `gradient` partition strategies' clustering.

Input: a class x class cosine matrix of per-class mean-loss gradients of the adapter-site weights
(measured on the frozen base by `grasp_jax.run.gradient_partition`). A class whose diagonal entry
is NaN was not measured (too few images, or no sample drawn).

Why average linkage (UPGMA) on the distance 1 - cos, cut into exactly K clusters:
  * Its merge criterion *is* the objective: at every step it joins the two clusters whose classes
    have the highest mean pairwise cosine, so the clusters it forms are the ones of high mean
    within-cluster alignment (the quantity `gradient_conflict.group_alignment` reports).
  * It takes the signed cosine as it is. Opposed gradients (cos < 0) are the conflict GRASP
    separates; spectral clustering needs a non-negative affinity, so it would have to shift or
    exponentiate the cosines, an arbitrary choice that changes the clusters.
  * It is deterministic (no k-means initialisation in a spectral embedding) and exact for the
    class counts here (C up to ~1000: O(C^2) memory).
Single linkage chains weakly related classes together and complete linkage is decided by one
worst pair; average linkage is the one of the three that scores a cluster by all its pairs.
"""
from typing import Sequence

import numpy as np
from scipy.cluster import hierarchy
from scipy.spatial import distance


def cluster_cosine(cos, k: int) -> np.ndarray:
  """Cluster labels int[n] in 0..k-1 of a finite, symmetric n x n cosine matrix (average linkage).

  Labels are numbered by the first class of each cluster (class 0 is in cluster 0).
  """
  cos = np.asarray(cos, np.float64)
  n = cos.shape[0]
  if cos.shape != (n, n) or not np.isfinite(cos).all():
    raise ValueError(f"cluster_cosine needs a finite square matrix, got shape {cos.shape}")
  if not 1 <= k <= n:
    raise ValueError(f"cannot cut {n} classes into k={k} clusters")
  if k == n:
    return np.arange(n)
  if k == 1:
    return np.zeros(n, np.int64)
  dist = np.clip(1.0 - 0.5 * (cos + cos.T), 0.0, 2.0)
  np.fill_diagonal(dist, 0.0)
  tree = hierarchy.linkage(distance.squareform(dist, checks=False), method="average")
  labels = hierarchy.cut_tree(tree, n_clusters=k).ravel()
  _, first = np.unique(labels, return_index=True)
  return np.argsort(np.argsort(first))[labels]


def gradient_groups(idx: Sequence[int], cos, k: int | None, rarest_first: Sequence[int]):
  """Groups (lists of class indices, head first) and names of the classes `idx` for K clusters.

  cos: the [C, C] cosine matrix over all classes; only the rows/columns of `idx` are used.
  rarest_first: all class indices from rarest to most frequent (`partition.rarity_order`).
  Measured classes (finite diagonal) are clustered by `cluster_cosine`. An unmeasured class gets
  the rarest-label rule's treatment: it joins the cluster of the rarest *measured* class, as a
  multi-label sample joins the cluster of its rarest label, so too-rare classes always train the
  tail-most adapter rather than being absorbed by a head cluster. Clusters are ordered by their
  most frequent class (the head cluster first) and named grad_0, grad_1, ...
  """
  cos = np.asarray(cos, np.float64)
  c = len(rarest_first)
  if cos.shape != (c, c):
    raise ValueError(f"the cosine matrix has shape {cos.shape}, expected ({c}, {c}) for {c} "
                     "classes")
  if k is None or k < 1:
    raise ValueError(f"gradient strategies need k >= 1 gradient clusters, got {k}")
  measured = [i for i in idx if np.isfinite(cos[i, i])]
  sub = cos[np.ix_(measured, measured)]
  if not np.isfinite(sub).all():
    raise ValueError("the cosine matrix has NaN entries between measured classes")
  if len(measured) < k:
    raise ValueError(f"k={k} gradient clusters, but only {len(measured)} of {len(idx)} classes "
                     "were measured")
  labels = cluster_cosine(sub, k)
  cluster_of = dict(zip(measured, labels.tolist()))
  rank = np.empty(c, np.int64)
  rank[np.asarray(rarest_first)] = np.arange(c)
  tail = cluster_of[min(measured, key=lambda i: rank[i])]
  groups = [[i for i in idx if cluster_of.get(i, tail) == g] for g in range(k)]
  groups.sort(key=lambda g: -max(rank[i] for i in g))
  return groups, [f"grad_{g}" for g in range(k)]


def split_half_reliability(cos_a, cos_b, measured=None) -> dict:
  """Agreement of two cosine matrices measured on disjoint halves of the batches.

  split_half: Pearson r of their off-diagonal entries (i < j) among `measured` classes (default:
  the classes with a finite diagonal in both); spearman_brown: 2r / (1 + r), the reliability of
  the matrix from both halves together; pairs: how many entries were compared. NaN when fewer
  than 3 pairs or an entry set is constant.
  """
  cos_a, cos_b = np.asarray(cos_a, np.float64), np.asarray(cos_b, np.float64)
  if measured is None:
    measured = np.isfinite(np.diagonal(cos_a)) & np.isfinite(np.diagonal(cos_b))
  keep = np.flatnonzero(measured)
  rows, cols = np.triu_indices(len(keep), 1)
  a, b = cos_a[keep[rows], keep[cols]], cos_b[keep[rows], keep[cols]]
  ok = np.isfinite(a) & np.isfinite(b)
  a, b = a[ok], b[ok]
  r = np.nan
  if a.size >= 3 and a.std() > 0 and b.std() > 0:
    r = float(np.corrcoef(a, b)[0, 1])
  return {"split_half": r, "spearman_brown": 2 * r / (1 + r) if r > -1 else np.nan,
          "pairs": int(a.size)}
