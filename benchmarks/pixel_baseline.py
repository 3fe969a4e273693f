"""Pixel baseline for real-image results: logistic regression on 16x16 grey pixels (train split -> test split).

Usage: python benchmarks/pixel_baseline.py PREPARED_DIR [...]
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from galaxalign_dist.data import shards


def load(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    table = shards.dataset(path, split).to_table(columns=["image", "label"])
    pixels = [
        np.asarray(Image.open(io.BytesIO(b)).convert("L").resize((16, 16)), np.float32).ravel() / 255
        for b in table.column("image").to_pylist()
    ]
    return np.stack(pixels), table.column("label").to_numpy()


def main(paths: list[str]) -> None:
    for path in paths:
        x_train, y_train = load(path, "train")
        x_test, y_test = load(path, "test")
        pred = LogisticRegression(max_iter=2000, C=0.1).fit(x_train, y_train).predict(x_test)
        acc, f1 = accuracy_score(y_test, pred), f1_score(y_test, pred, average="macro")
        majority = np.bincount(y_test).max() / len(y_test)
        print(
            f"{path.rstrip('/').split('/')[-1]} n_train={len(y_train)} n_test={len(y_test)} "
            f"acc={acc:.3f} f1={f1:.3f} majority={majority:.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
