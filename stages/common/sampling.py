"""Class-stratified, seeded samples of a split's labels: the calibration stage's picks, the
quantizers' calibration subsets (rknn_quantize's search) and the images a limit keeps
(``evaluate.limit``, ``quantize.data_limit``: ``limited``) come from the one function.

Standard library and numpy only."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def stratified_counts(class_sizes: Mapping[int, int], count: int) -> dict[int, int]:
    """How many images to take from each class: proportional to the class sizes (largest remainder,
    ties to the lower class id), at least one per non-empty class when ``count`` allows, never more
    than a class holds. Sums to ``min(count, total)``."""
    sizes = {c: int(n) for c, n in sorted(class_sizes.items()) if n > 0}
    total = sum(sizes.values())
    count = min(int(count), total)
    if count <= 0:
        return {c: 0 for c in sizes}
    exact = {c: count * n / total for c, n in sizes.items()}
    take = {c: int(np.floor(v)) for c, v in exact.items()}
    for c in sorted(sizes, key=lambda c: (-(exact[c] - take[c]), c))[: count - sum(take.values())]:
        take[c] += 1
    if count >= len(sizes):  # every class represented: move one from the largest allocation
        for c in sizes:
            if take[c] == 0:
                donor = max(take, key=lambda d: (take[d], -d))
                take[donor] -= 1
                take[c] = 1
    return take


def select(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices into ``labels`` of a stratified sample, in a seeded order that mixes the classes (a split
    is stored in class order: a list in that order would make every prefix of it -- the images a
    quantizer analyses first, a smaller calibration subset -- one class). Deterministic for a seed."""
    labels = np.asarray(labels)
    classes, sizes = np.unique(labels, return_counts=True)
    take = stratified_counts(dict(zip(classes.tolist(), sizes.tolist())), count)
    rng = np.random.default_rng(seed)
    picked = []
    for c in sorted(take):  # fixed order: the same seed gives the same picks
        members = np.flatnonzero(labels == c)
        if take[c]:
            picked.append(rng.choice(members, size=take[c], replace=False))
    return rng.permutation(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


LIMIT_SEED = 0  # evaluate.limit and quantize.data_limit: one seed, so the same limit keeps the same images


def limited(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """The rows of a split that a limit of ``limit`` images keeps, ascending: every row when ``limit`` is
    None or covers the split, else a seeded class-stratified sample (a split is stored in class order, so
    its first rows would be its first classes only). A pure function of the labels and the count:
    evaluate recomputes which images a stage's stored logits belong to from their number."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(select(labels, limit, LIMIT_SEED)).astype(np.int64)
