"""What one shard's FAISS index costs, read from an empty index that faiss builds from the factory string.

An index read back from disk (as IndexShard reads it) holds exactly its serialised parts, so its memory and its
file size are the same: bytes per vector times the shard's vectors, plus fixed parts that do not grow with them
(coarse centroids, PQ codebooks, transform matrices). Per vector:
  flat codes (Flat, PQ, SQ)   the code (Flat: 4 x dim)
  IVF                         the code and its 8-byte id in an inverted list
  HNSW                        the storage's code, the expected neighbour links (4 bytes each: 2M at level 0, M at
                              each level above, levels drawn with faiss' own probabilities), 8 + 4 bytes of
                              offset and level
  Refine                      both indexes' codes
  OPQ, PCA, ... transforms    nothing per vector; their matrices are fixed
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import faiss

from rag_lightning.errors import UserError

ID_BYTES = 8  # an inverted list's id per vector (faiss idx_t)
FLOAT_BYTES = 4
HNSW_OFFSET_AND_LEVEL_BYTES = 8 + 4
TRAINING_POINTS_PER_CENTROID = 39  # faiss' k-means warns with fewer training vectors per centroid


@dataclass(frozen=True)
class IndexModel:
    factory: str
    dim: int
    parts: str  # what faiss made of the factory string, e.g. "IVF1024 (Flat quantizer), PQ16x8"
    bytes_per_vector: float
    fixed_bytes: float
    train_min: int = 0  # faiss refuses to train on fewer vectors (clusters of k-means)
    nlist: int = 0  # IVF lists (0: not IVF)
    hnsw_m: int = 0  # HNSW links per level (0: no HNSW graph on top)
    scan_bytes: float = 0.0  # bytes of one vector's code read by an exhaustive or inverted-list scan
    scan_kind: str = "float"  # "float" (Flat, SQ: compared in floats), "pq" (table look-ups)
    pq_centroids: int = 0  # centroids of each PQ sub-quantizer (0: no PQ)
    quantizer: IndexModel | None = None  # an IVF index's coarse quantizer over its nlist centroids

    def shard_bytes(self, vectors: float) -> float:
        """Memory of the index of one shard of `vectors` (and the size of its file)."""
        return self.fixed_bytes + vectors * self.bytes_per_vector

    @property
    def train_advised(self) -> int:
        return self.train_min * TRAINING_POINTS_PER_CENTROID


def index_model(factory: str, dim: int, key: str = "index.factory") -> IndexModel:
    """The cost model of `factory` at dimension `dim` (UserError naming `key` for a string faiss refuses or a kind
    of index this model does not know)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].split("Error: ")[-1]
        raise UserError(
            f"{key}: faiss cannot make an inner-product index of {factory!r} at dimension {dim} ({reason})"
        ) from None
    return replace(_model(index, key, factory), factory=factory, dim=dim)


def _model(owner: faiss.Index, key: str, factory: str) -> IndexModel:
    # a view (`owner` keeps the C++ object alive); Any: faiss' stubs lack the SWIG classes' own members
    index: Any = faiss.downcast_index(owner)
    d = index.d
    if isinstance(index, faiss.IndexPreTransform):
        inner = _model(index.index, key, factory)
        fixed, names = 0.0, []
        for i in range(index.chain.size()):
            transform = index.chain.at(i)
            fixed += (transform.d_in + 1) * transform.d_out * FLOAT_BYTES  # matrix and bias
            names.append(
                f"{type(faiss.downcast_VectorTransform(transform)).__name__} {transform.d_in}->{transform.d_out}"
            )
        return replace(inner, parts=", ".join([*names, inner.parts]), fixed_bytes=inner.fixed_bytes + fixed)
    if isinstance(index, faiss.IndexIVF):
        quantizer = _model(index.quantizer, key, factory)
        codes = _codes(index, d)
        return IndexModel(
            factory,
            d,
            f"IVF{index.nlist} ({quantizer.parts} quantizer), {codes.parts}",
            bytes_per_vector=index.code_size + ID_BYTES,
            fixed_bytes=quantizer.shard_bytes(index.nlist) + codes.fixed_bytes,
            train_min=max(index.nlist, codes.train_min),
            nlist=index.nlist,
            scan_bytes=index.code_size,
            scan_kind=codes.scan_kind,
            pq_centroids=codes.pq_centroids,
            quantizer=quantizer,
        )
    if isinstance(index, faiss.IndexHNSW):
        storage = _model(index.storage, key, factory)
        hnsw = index.hnsw
        probabilities = faiss.vector_to_array(hnsw.assign_probas)
        links = sum(p * hnsw.cum_nb_neighbors(level + 1) for level, p in enumerate(probabilities))
        m = hnsw.nb_neighbors(1)
        return replace(
            storage,
            parts=f"HNSW{m} over {storage.parts}",
            hnsw_m=m,
            bytes_per_vector=storage.bytes_per_vector + links * 4 + HNSW_OFFSET_AND_LEVEL_BYTES,
        )
    if isinstance(index, faiss.IndexRefine):
        base, refine = _model(index.base_index, key, factory), _model(index.refine_index, key, factory)
        return replace(
            base,
            parts=f"{base.parts}, refined by {refine.parts}",
            bytes_per_vector=base.bytes_per_vector + refine.bytes_per_vector,
            fixed_bytes=base.fixed_bytes + refine.fixed_bytes,
        )
    if isinstance(index, faiss.IndexFlatCodes):
        codes = _codes(index, d)
        return replace(codes, bytes_per_vector=index.code_size, scan_bytes=index.code_size)
    raise UserError(
        f"{key}: {factory!r} makes a {type(index).__name__}, which the planner does not model (it "
        "knows Flat, PQ, SQ, IVF, HNSW, Refine and transforms such as OPQ and PCA)"
    )


def _codes(index: faiss.Index, d: int) -> IndexModel:
    """The vector codes of a flat-code or IVF index: what they are, their fixed codebook, their training needs."""
    pq = getattr(index, "pq", None)
    if pq is not None:
        return IndexModel(
            "",
            d,
            f"PQ{pq.M}x{pq.nbits}",
            0.0,
            fixed_bytes=pq.ksub * d * FLOAT_BYTES,
            train_min=pq.ksub,
            scan_kind="pq",
            pq_centroids=pq.ksub,
        )
    sq = getattr(index, "sq", None)
    if sq is not None:
        return IndexModel("", d, f"SQ ({index.code_size} bytes)", 0.0, fixed_bytes=2 * d * FLOAT_BYTES)
    return IndexModel("", d, "Flat", 0.0, 0.0)
