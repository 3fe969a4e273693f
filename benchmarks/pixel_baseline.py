"""Pixel baseline for real-image results: logistic regression on 16x16 grey pixels (train split -> test split).

Usage: python benchmarks/pixel_baseline.py PREPARED_DIR [...]
"""

import io, sys, numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from galaxalign_dist import shards


def load(d, split):
    t = shards.dataset(d, split).to_table(columns=["image", "label"])
    X = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(b)).convert("L").resize((16, 16)), np.float32).ravel() / 255
            for b in t.column("image").to_pylist()
        ]
    )
    return X, t.column("label").to_numpy()


for d in sys.argv[1:]:
    Xtr, ytr = load(d, "train")
    Xte, yte = load(d, "test")
    p = LogisticRegression(max_iter=2000, C=0.1).fit(Xtr, ytr).predict(Xte)
    print(
        d.split("/")[-1],
        f"n_train={len(ytr)} n_test={len(yte)} acc={accuracy_score(yte, p):.3f} f1={f1_score(yte, p, average='macro'):.3f} majority={np.bincount(yte).max() / len(yte):.3f}",
    )
