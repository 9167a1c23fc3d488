"""scikit-learn's embedded ``digits`` (8×8 images, 10 classes): nothing is downloaded."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from implicit_core import ConfigurationError


@dataclass(frozen=True)
class Digits:
    """Standardised features (float32) and integer labels, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return int(self.y_train.max()) + 1


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """The 1797 digits, split per class (stratified) with ``seed``; scaled with train statistics."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:
        raise ConfigurationError(
            "the demo trains on scikit-learn's digits: pip install 'implicit-core[examples]'"
        ) from exc
    X, y = sklearn_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):  # stratified: every class in the same proportion
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[: round(test_fraction * len(idx))]] = True
    mean, std = X[~test].mean(0), X[~test].std(0)
    X = (X - mean) / np.where(std > 0, std, 1.0)  # some border pixels are always 0
    X = X.astype(np.float32)
    return Digits(X[~test], y[~test].astype(np.int64), X[test], y[test].astype(np.int64))


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled index batches of equal size (the remainder is left for the next epoch's shuffle).

    Equal sizes keep compiled backends (JAX) on one shape.
    """
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
