"""A client's own label prior, for local-prior logit adjustment (``--logit-adjustment``).

Under label skew each client sees a few labels (in a generation framing: a few reply tokens)
far more often than the pool does, and local training teaches the adapter those frequencies as
much as the task. Logit adjustment (Menon et al., ICLR 2021) with each client's own prior
trains it on logits shifted by its log prior, so that what the adapter learns is the label-free
part, which all clients share: the idea of FedLC (Zhang et al., ICML 2022, "Federated Learning
with Label Distribution Skew via Logits Calibration"), which shifts by a per-class margin.
Here the "labels" are the vocabulary: a client's prior is the smoothed frequency of each token
among the labelled (reply) tokens of its training rows, counted once a round on the client;
nothing of it leaves.

Pure numpy; ``client.train`` turns the prior into the logit bias of ``client.loss.logit_bias``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from client.data import IGNORE_INDEX

# Added to every token's count: a token a client never replies with gets a finite log prior.
PRIOR_SMOOTHING = 0.5


def reply_token_counts(labels: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """How often each token id occurs among the labelled positions of ``labels`` (rows of
    token ids, ``IGNORE_INDEX`` where not trained on): float64 (vocab_size,)."""
    ids = np.fromiter((t for row in labels for t in row), dtype=np.int64)
    ids = ids[ids != IGNORE_INDEX]
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token id outside the vocabulary of {vocab_size}")
    return np.bincount(ids, minlength=vocab_size).astype(np.float64)


def log_prior(counts: np.ndarray, smoothing: float = PRIOR_SMOOTHING) -> np.ndarray:
    """log((c_v + s) / (sum(c) + s V)): the smoothed log frequency of each of the V tokens."""
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    c = np.asarray(counts, dtype=np.float64)
    out: np.ndarray = np.log((c + smoothing) / (c.sum() + smoothing * c.size))
    return out


def logit_adjustment_bias(
    labels: Iterable[Sequence[int]], vocab_size: int, tau: float
) -> np.ndarray:
    """The bias a client adds to its training logits: tau x its log prior, float32 (V,)."""
    return (tau * log_prior(reply_token_counts(labels, vocab_size))).astype(np.float32)
