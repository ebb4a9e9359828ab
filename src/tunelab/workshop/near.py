"""Near-duplicate search: MinHash signatures over character shingles, LSH banding.

Character n-grams (not words) so Chinese, which has no spaces, works the same as
English. Candidates that share a band are confirmed by the Jaccard similarity the
signatures estimate, so the threshold means what it says.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_PRIME = np.uint64((1 << 31) - 1)  # Mersenne prime: a*x + b < 2^62 fits in uint64
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The form duplicates are compared in: NFKC, case-folded, no punctuation, single spaces."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def shingles(text: str, n: int = 5) -> set[str]:
    """Character n-grams of normalised text (the whole text when it is shorter)."""
    text = normalize(text)
    if len(text) <= n:
        return {text}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


class MinHasher:
    """MinHash with ``num_perm`` hash functions ``(a*x + b) mod (2^31 - 1)``.

    ``x`` is a 31-bit hash of the shingle and ``a, b < 2^31``, so ``a*x + b`` stays
    below 2^62 and numpy's uint64 arithmetic is exact; the modulus is what makes each
    function a different permutation.
    """

    def __init__(self, num_perm: int = 128, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, int(_PRIME), size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, int(_PRIME), size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, grams: set[str]) -> np.ndarray:
        values = np.array(
            [int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little") for g in grams],
            dtype=np.uint64,
        ) % _PRIME
        return ((self.a[:, None] * values[None, :] + self.b[:, None]) % _PRIME).min(axis=1)


def drop_boilerplate(gram_sets: list[set[str]], max_df: float = 0.5, min_rows: int = 20) -> list[set[str]]:
    """Remove shingles found in more than ``max_df`` of the rows (a shared prompt template).

    Without this, rows built from one long fixed prompt all look alike: only the
    part that varies (the term, the question) should decide near-duplication.
    A row made only of boilerplate keeps its shingles.
    """
    if len(gram_sets) < min_rows:
        return gram_sets
    counts: dict[str, int] = {}
    for grams in gram_sets:
        for gram in grams:
            counts[gram] = counts.get(gram, 0) + 1
    limit = max_df * len(gram_sets)
    common = {gram for gram, n in counts.items() if n > limit}
    if not common:
        return gram_sets
    return [(grams - common) or grams for grams in gram_sets]


def similarity(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float(np.mean(sig_a == sig_b))


class NearIndex:
    """Signatures banded into buckets; ``query`` returns the best match above ``threshold``."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 32, shingle: int = 5) -> None:
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold, self.bands, self.rows, self.shingle = threshold, bands, num_perm // bands, shingle
        self.hasher = MinHasher(num_perm)
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        return self.hasher.signature(shingles(text, self.shingle))

    def signatures_for(self, texts: list[str], max_df: float = 0.5) -> list[np.ndarray]:
        """Signatures of many texts, with shingles common to most of them left out."""
        grams = drop_boilerplate([shingles(t, self.shingle) for t in texts], max_df)
        return [self.hasher.signature(g) for g in grams]

    def query(self, sig: np.ndarray) -> tuple[int, float] | None:
        """``(index, similarity)`` of the most similar stored text at or above the threshold."""
        candidates: set[int] = set()
        for band, table in enumerate(self.buckets):
            candidates.update(table.get(self._key(sig, band), ()))
        best = max(((i, similarity(sig, self.signatures[i])) for i in candidates), key=lambda t: t[1], default=None)
        return best if best is not None and best[1] >= self.threshold else None

    def add(self, sig: np.ndarray) -> int:
        index = len(self.signatures)
        self.signatures.append(sig)
        for band, table in enumerate(self.buckets):
            table.setdefault(self._key(sig, band), []).append(index)
        return index

    def _key(self, sig: np.ndarray, band: int) -> bytes:
        return sig[band * self.rows:(band + 1) * self.rows].tobytes()
