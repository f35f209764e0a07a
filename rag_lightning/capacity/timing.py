"""How long one shard's index takes to search a query and to build, scaled from figures measured on one thread.

Search, one query on one thread:
  exhaustive scan (Flat, PQ, SQ)  vectors x code bytes / the measured scan rate of that kind of code
  IVF                             the coarse quantizer over nlist centroids (as its own index), then nprobe lists
                                  of vectors / nlist codes each, at the scan rate of the codes
  HNSW                            the measured time at its reference size, x efSearch / 16 x M / 32 x code bytes
                                  x ln(vectors) / ln(reference vectors) (the hops grow with the log of the graph)
Build, one shard on one thread (faiss' k-means: 25 iterations over at most 256 training vectors a centroid):
  IVF     k-means over nlist centroids, then assigning every vector to its list (2 x d flops a centroid)
  PQ      k-means of the sub-quantizers (d in all, pq_centroids each), then encoding every vector
  HNSW    the measured time a vector at the reference size, scaled like a search
  Flat    nothing to train; adding is a copy
k-means and assignment run at the flops/s measured building IVF1024,Flat (BLAS) and PQ16 (small sub-problems,
slower a flop).
"""

from __future__ import annotations

import math

from rag_lightning.capacity import measured
from rag_lightning.capacity.index_model import FLOAT_BYTES, IndexModel
from rag_lightning.errors import UserError

KMEANS_ITERATIONS = 25
KMEANS_MAX_POINTS_PER_CENTROID = 256
DEFAULT_NPROBE = 1  # faiss' defaults, where service.search_params does not set them
DEFAULT_EF_SEARCH = 16


def search_params(text: str, key: str = "service.search_params") -> dict[str, float]:
    """service.search_params ("nprobe=16,efSearch=64") as a dict."""
    params = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            params[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"{key}: {part!r} is not name=number") from None
    return params


def search_seconds(model: IndexModel, vectors: float, params: dict[str, float]) -> float:
    """One query's search time over a shard of `vectors`, on one thread."""
    if model.nlist:
        assert model.quantizer is not None  # an inverted-file index has one
        nprobe = min(params.get("nprobe", DEFAULT_NPROBE), model.nlist)
        return search_seconds(model.quantizer, model.nlist, params) + _scan_seconds(
            model, nprobe * vectors / model.nlist
        )
    if model.hnsw_m:
        return (
            measured.HNSW_SEARCH_S
            * params.get("efSearch", DEFAULT_EF_SEARCH)
            / DEFAULT_EF_SEARCH
            * _hnsw_scale(model, vectors)
        )
    return _scan_seconds(model, vectors)


def build_seconds(model: IndexModel, vectors: float) -> float:
    """Training the index of a shard of `vectors` and adding them, on one thread."""
    seconds = _kmeans_flops(model.nlist, model.dim, vectors) / measured.KMEANS_FLOPS_PER_S
    seconds += _kmeans_flops(model.pq_centroids, model.dim, vectors) / measured.PQ_TRAIN_FLOPS_PER_S
    if model.hnsw_m:
        seconds += measured.HNSW_BUILD_S_PER_VECTOR * vectors * _hnsw_scale(model, vectors)
    return seconds


def _scan_seconds(model: IndexModel, codes: float) -> float:
    rate = measured.PQ_SCAN_BYTES_PER_S if model.scan_kind == "pq" else measured.FLOAT_SCAN_BYTES_PER_S
    return codes * model.scan_bytes / rate


def _hnsw_scale(model: IndexModel, vectors: float) -> float:
    """An HNSW graph's cost relative to the measured one (HNSW32 over Flat codes at the reference size)."""
    return (
        model.hnsw_m
        / 32
        * model.scan_bytes
        / (FLOAT_BYTES * measured.REFERENCE_DIM)
        * math.log(max(vectors, 2))
        / math.log(measured.REFERENCE_VECTORS)
    )


def _kmeans_flops(centroids: int, dim: int, vectors: float) -> float:
    """Training k-means of `centroids` over `dim` dimensions, then assigning every vector to one."""
    if not centroids:
        return 0.0
    training = min(vectors, KMEANS_MAX_POINTS_PER_CENTROID * centroids)
    return 2 * centroids * dim * (KMEANS_ITERATIONS * training + vectors)
