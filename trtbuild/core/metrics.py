"""The one place output-comparison metrics are defined (fidelity gate, FP16 checks, profiler, handoffs).

Every function takes the reference first and the candidate second, with samples on axis 0, and returns
float64 numbers. Edge cases are decided once, here: two all-zero samples agree perfectly (cosine 1); an
all-zero sample against a non-zero one does not agree at all (cosine 0), so a graph that outputs zeros
never passes a cosine check.
"""

from __future__ import annotations

import math

import numpy as np


def _rows(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    return a.reshape(1, -1) if a.ndim < 2 else a.reshape(a.shape[0], -1)


def cosine_per_sample(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (outputs flattened per sample)."""
    r, c = _rows(reference), _rows(candidate)
    if r.shape != c.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    r_norm, c_norm = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    dots = (r * c).sum(axis=1)
    both_zero = (r_norm == 0) & (c_norm == 0)
    one_zero = (r_norm == 0) ^ (c_norm == 0)
    cos = dots / np.where(r_norm * c_norm > 0, r_norm * c_norm, 1.0)
    return np.clip(np.where(both_zero, 1.0, np.where(one_zero, 0.0, cos)), -1.0, 1.0)


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - cand|^2) over all samples: inf when identical."""
    r, c = _rows(reference), _rows(candidate)
    noise = float(((r - c) ** 2).sum())
    signal = float((r**2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.abs(_rows(reference) - _rows(candidate)).max(initial=0.0))


def error_over_range(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Largest absolute error relative to the reference's value range (max - min; max |ref| when the
    range is 0): an error measure that stays meaningful where the reference crosses zero."""
    r = _rows(reference)
    span = float(r.max(initial=0.0) - r.min(initial=0.0)) or float(np.abs(r).max(initial=0.0))
    err = max_abs_error(reference, candidate)
    if span == 0:
        return 0.0 if err == 0 else math.inf
    return err / span


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Share of samples whose argmax over the last axis is the same ([N, classes] outputs)."""
    r, c = np.asarray(reference), np.asarray(candidate)
    return float((r.argmax(axis=-1) == c.argmax(axis=-1)).mean())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over samples of KL(p || q) for probability rows (last axis)."""
    p64, q64 = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return float(np.mean(np.sum(p64 * (np.log(p64 + eps) - np.log(q64 + eps)), axis=-1)))


PROB_MAP_THRESHOLD = 0.3  # DBNet's binarization threshold for its probability map


def map_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float = PROB_MAP_THRESHOLD) -> float:
    """Mean over samples of the IoU of the two maps thresholded at ``threshold`` (> threshold is "on"), as
    a segmentation/text detector binarizes its probability map; a sample empty in both counts as 1."""
    r, c = _rows(reference) > threshold, _rows(candidate) > threshold
    if r.shape != c.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    inter = (r & c).sum(axis=1)
    union = (r | c).sum(axis=1)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())
