"""The built-in tiny generator: deterministic text with no weights to download.

A fixed pseudo-random bigram table stands in for a model. Sampling honours ``temperature``
(0 is greedy), ``top_k`` (0 keeps all) and ``top_p`` (nucleus), and the random choices are
seeded by the model name, the prompt and ``seed``: the same request always yields the same
tokens, and exactly ``max_tokens`` of them.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator

__all__ = ["VOCABULARY", "tiny_tokens"]

_WORDS = """the a trio job runs in its own nursery and every task ends before the signal
narration flows through a memory channel to each subscriber while scopes cancel cleanly
queen hive worker stream token model prompt quietly with structured concurrency so
nothing leaks when deadlines fire or people press control c"""

VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split()))

_SIZE = len(VOCABULARY)


def _table() -> list[list[float]]:
    rng = random.Random(0x7E1A)
    return [[rng.gauss(0.0, 2.0) for _ in range(_SIZE)] for _ in range(_SIZE)]


_LOGITS = _table()


def _seed(model: str, prompt: str, seed: int | None) -> int:
    digest = hashlib.sha256(f"{model}\0{prompt}\0{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _choose(
    logits: list[float], rng: random.Random, temperature: float, top_p: float, top_k: int
) -> int:
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    if temperature <= 0:
        return order[0]
    if top_k > 0:
        order = order[:top_k]
    peak = logits[order[0]]
    weights = [math.exp((logits[i] - peak) / temperature) for i in order]
    total = sum(weights)
    kept: list[int] = []
    kept_weights: list[float] = []
    mass = 0.0
    for index, weight in zip(order, weights, strict=True):
        kept.append(index)
        kept_weights.append(weight)
        mass += weight / total
        if mass >= top_p:
            break
    return rng.choices(kept, weights=kept_weights)[0]


def tiny_tokens(
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float = 0.7,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield exactly ``max_tokens`` tokens (words with their leading space)."""
    rng = random.Random(_seed(model, prompt, seed))
    words = prompt.split()
    previous = sum(map(ord, words[-1])) % _SIZE if words else 0
    for n in range(max_tokens):
        index = _choose(_LOGITS[previous], rng, temperature, top_p, top_k)
        word = VOCABULARY[index]
        if n == 0:
            word = word.capitalize()
        yield word if n == 0 else " " + word
        previous = index
