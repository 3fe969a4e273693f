"""metrics.json's reported head is chosen on held-out train rows: the test split never picks it."""

from __future__ import annotations

import numpy as np

from galaxalign_dist.evaluation.metrics import evaluate_embeddings, l2_normalize

C, D = 3, 16


def _data(seed: int = 0):
    """Train images sit on the symbol prototypes; test images sit on the captions' embeddings.

    So the symbol head is the best head on (held-out) train rows, and the text head the best on test:
    a head chosen on the test split would be `text`, one chosen without it is `symbol`.
    """
    rng = np.random.default_rng(seed)
    sym = l2_normalize(rng.standard_normal((C, D)))
    text = l2_normalize(rng.standard_normal((C, D)))
    y_train, y_test = np.repeat(np.arange(C), 30), np.repeat(np.arange(C), 20)
    x_train = sym[y_train] + 0.1 * rng.standard_normal((len(y_train), D))
    x_test = text[y_test] + 0.1 * rng.standard_normal((len(y_test), D))
    s_train = sym[y_train] + 0.05 * rng.standard_normal((len(y_train), D))  # each row's symbol embedding
    return x_train, y_train, s_train, x_test, y_test, text, sym


def _evaluate(x_train, y_train, s_train, x_test, y_test, text, sym):
    return evaluate_embeddings(
        x_test, y_test, text, sym, C, train_image=x_train, train_labels=y_train, train_symbol=s_train
    )


def test_reported_head_is_chosen_on_train_rows_not_on_test():
    x_train, y_train, s_train, x_test, y_test, text, sym = _data()
    out = _evaluate(x_train, y_train, s_train, x_test, y_test, text, sym)
    heads = out["heads"]
    assert max(heads, key=lambda h: heads[h]["f1_macro"]) == "text"  # best on test...
    assert out["best_head"] == "symbol"  # ...but the head is chosen on held-out train rows
    assert (out["accuracy"], out["f1_macro"]) == (heads["symbol"]["accuracy"], heads["symbol"]["f1_macro"])
    sel = out["head_selection"]
    assert sel["split"] == "train_holdout" and sel["n"] == 18  # 20% of 90, stratified
    assert max(sel["f1_macro"], key=sel["f1_macro"].get) == "symbol"
    assert set(heads) == {"text", "symbol", "fused", "linear_probe"}  # every head's test figures kept


def test_test_labels_do_not_change_which_head_is_reported():
    x_train, y_train, s_train, x_test, y_test, text, sym = _data(1)
    a = _evaluate(x_train, y_train, s_train, x_test, y_test, text, sym)
    shuffled = np.random.default_rng(0).permutation(y_test)
    b = _evaluate(x_train, y_train, s_train, x_test, shuffled, text, sym)
    assert a["heads"] != b["heads"]  # the test figures do move with the labels...
    assert (a["best_head"], a["head_selection"]) == (b["best_head"], b["head_selection"])  # ...the choice not


def test_without_train_rows_the_text_head_is_reported():
    _, _, _, x_test, y_test, text, _ = _data()
    out = evaluate_embeddings(x_test, y_test, text, None, C)
    assert out["best_head"] == "text" and out["head_selection"]["split"] is None
    assert out["f1_macro"] == out["heads"]["text"]["f1_macro"]
