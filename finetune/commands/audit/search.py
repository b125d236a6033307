"""`finetune-audit`'s similarity search: each image's nearest neighbours, duplicate pairs and outlier scores.

One exact k-nearest-neighbour search over the pooled features serves both near duplicates
(neighbours above a similarity) and outliers (far from all their neighbours). Similarity is the
cosine of the features centred on their mean: pooled features are outputs of a ReLU, all
positive, so their plain cosines crowd towards 1. Measured on the photos of tests/test_audit.py
(lite0, ImageNet weights): resized copies scored 0.969-0.986 and distinct crops of one photo up
to 0.970, overlapping; centred, the copies score from 0.963 and distinct crops up to 0.955.
It is written here, as blocks of matrix products on the device that extracted the features:
no index library (faiss, hnswlib, annoy) is a dependency of this project, and scikit-learn's
`NearestNeighbors` and cleanlab's `OutOfDistribution` (which builds one) search on the CPU
only. Memory stays bounded by one block (BLOCK_BYTES) plus each image's k best, so a million
images need their features and k pairs per image, never an n x n matrix.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Bytes of one block of similarities (query rows x reference rows, float32): the search's working memory.
BLOCK_BYTES = 256 * 2**20
#: Reference rows per block: with BLOCK_BYTES, 1024 query rows per block.
REFERENCE_ROWS = 65536


@torch.no_grad()
def nearest_neighbours(features: Tensor, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Each row's `k` most similar other rows (centred cosine): (similarities, descending; their rows), n x k, on the CPU.

    Exact: every pair is compared. Each block's own top k is merged into the running top k,
    so the whole n x n similarity matrix never exists.
    """
    n = len(features)
    k = min(k, n - 1)
    features = features.float()
    unit = F.normalize(features - features.mean(dim=0), dim=1).to(device)
    reference_rows = min(max(n, 1), REFERENCE_ROWS)
    query_rows = max(1, BLOCK_BYTES // (4 * reference_rows))
    similarities = torch.empty(n, k)
    indices = torch.empty(n, k, dtype=torch.int64)
    for q0 in range(0, n, query_rows):
        query = unit[q0:q0 + query_rows]
        rows = torch.arange(q0, q0 + len(query), device=device)
        best = torch.full((len(query), 0), -torch.inf, device=device)
        best_index = torch.zeros((len(query), 0), dtype=torch.int64, device=device)
        for r0 in range(0, n, reference_rows):
            block = query @ unit[r0:r0 + reference_rows].T
            own = (rows >= r0) & (rows < r0 + block.shape[1])  # an image is not its own neighbour
            block[own.nonzero().squeeze(1), rows[own] - r0] = -torch.inf
            top = block.topk(min(k, block.shape[1]), dim=1)
            merged = torch.cat([best, top.values], dim=1)
            merged_index = torch.cat([best_index, top.indices + r0], dim=1)
            keep = merged.topk(k, dim=1)
            best, best_index = keep.values, merged_index.gather(1, keep.indices)
        similarities[q0:q0 + len(query)] = best.cpu()
        indices[q0:q0 + len(query)] = best_index.cpu()
    return similarities, indices


def content_hash(data: bytes | memoryview) -> bytes:
    """A digest of an image's stored bytes: equal digests are exact copies."""
    return hashlib.blake2b(data, digest_size=16).digest()


@dataclass(frozen=True)
class Pairs:
    """Duplicate pairs as rows into the audit's image list (a < b), their similarity and whether they are exact."""

    a: np.ndarray
    b: np.ndarray
    similarity: np.ndarray
    exact: np.ndarray

    def __len__(self) -> int:
        return len(self.a)

    def ordered(self, split: np.ndarray) -> Pairs:
        """Pairs across splits (leakage) first, then the most similar first."""
        order = np.lexsort((-self.similarity, split[self.a] == split[self.b]))
        return Pairs(self.a[order], self.b[order], self.similarity[order], self.exact[order])


def exact_pairs(hashes: Sequence[bytes], split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) rows of files with equal bytes: each copy paired with one member of its group, not every two.

    A group of m copies gives m - 1 pairs (m(m-1)/2 would be quadratic in a folder of many
    identical files). The anchor is the group's first member in split order (train, val,
    test), so a copy in val or test pairs with a training image: a pair across splits
    whenever the group crosses one.
    """
    groups: dict[bytes, list[int]] = {}
    for row, digest in enumerate(hashes):
        groups.setdefault(digest, []).append(row)
    a, b = [], []
    for members in groups.values():
        if len(members) > 1:
            anchor, *others = sorted(members, key=lambda row: (split[row], row))
            a += [anchor] * len(others)
            b += others
    return np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)


def duplicate_pairs(similarities: Tensor, indices: Tensor, threshold: float, exact: tuple[np.ndarray, np.ndarray],
                    split: np.ndarray) -> Pairs:
    """Exact pairs, and neighbour pairs at or above `threshold` that are not copies of each other, ordered."""
    rows, slots = (similarities >= threshold).nonzero(as_tuple=True)
    near_a = torch.minimum(rows, indices[rows, slots]).numpy()
    near_b = torch.maximum(rows, indices[rows, slots]).numpy()
    near_similarity = similarities[rows, slots].numpy().astype(np.float64)
    n = max(len(split), 1)
    near_key, first = np.unique(near_a * n + near_b, return_index=True)  # each pair found from both of its sides
    exact_a, exact_b = exact
    copies = _copy_groups(exact_a, exact_b, n)
    kept = first[copies[near_a[first]] != copies[near_b[first]]]  # copies of one file are listed as exact pairs
    near_a, near_b, near_similarity = near_a[kept], near_b[kept], near_similarity[kept]
    pairs = Pairs(  # identical bytes: similarity 1, whatever float rounding made of their features
        np.concatenate([np.minimum(exact_a, exact_b), near_a]), np.concatenate([np.maximum(exact_a, exact_b), near_b]),
        np.concatenate([np.ones(len(exact_a)), near_similarity]),
        np.concatenate([np.ones(len(exact_a), bool), np.zeros(len(near_a), bool)]),
    )
    return pairs.ordered(split)


def _copy_groups(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Each row's group of identical files (its own row when it has no copy): exact pairs are anchor -> member."""
    group = np.arange(n)
    group[b] = a
    return group


def outlier_scores(similarities: Tensor) -> np.ndarray:
    """Mean cosine distance to an image's k nearest neighbours: large for an image unlike every other, so every class."""
    return (1 - similarities.double()).mean(dim=1).numpy()


def outlier_fence(scores: np.ndarray, iqr_factor: float) -> float:
    """Q3 + iqr_factor * IQR of the scores: Tukey's fence, as cleanlab's Datalab flags outliers by kNN distance."""
    q1, q3 = np.percentile(scores, [25, 75]) if len(scores) else (0.0, 0.0)
    return float(q3 + iqr_factor * (q3 - q1))

