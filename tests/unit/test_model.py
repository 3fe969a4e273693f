"""The tri-modal model: towers, stage-2 symbol-tower copy, temperature clamp, per-tower parameter groups."""

from __future__ import annotations

import math

import torch

from galaxalign_dist import config
from galaxalign_dist.train.engine import lr_lambda, param_groups
from galaxalign_dist.train.model import build_model, build_tokenizer


def _inputs(cfg, b=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(b, 3, 64, 64, generator=g)
    tokens = build_tokenizer(cfg.model)(["A picture of a round smooth galaxy"] * b)
    return images, tokens


def test_stage1_symbols_use_image_tower_and_stage2_copy_is_exact():
    cfg = config.load("demo_cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.loss)
    assert model.symbol is None
    images, tokens = _inputs(cfg)
    symbols = torch.randn_like(images)
    out1 = model(images, tokens, symbols)
    torch.testing.assert_close(out1["symbol"], model.encode_image(symbols))  # shared encoder
    model.add_symbol_tower()
    for (n1, p1), (n2, p2) in zip(
        model.image.state_dict().items(), model.symbol.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(p1, p2)
    out2 = model(images, tokens, symbols)
    torch.testing.assert_close(out2["symbol"], out1["symbol"])  # same function right after the copy
    # ...but separate parameters: updating one tower leaves the other alone.
    with torch.no_grad():
        next(model.symbol.parameters()).add_(1.0)
    assert not torch.allclose(model(images, tokens, symbols)["symbol"], out1["symbol"])
    torch.testing.assert_close(model(images, tokens, symbols)["image"], out1["image"])


def test_temperature_init_and_clamp_inside_forward():
    cfg = config.load("demo_cpu")
    model = build_model(cfg.model, cfg.loss)
    assert model.logit_scale.shape == (1,)  # 1-D: ZeRO-3 cannot partition 0-dim parameters
    assert math.isclose(model.temperature_scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) >> 100
    images, tokens = _inputs(cfg)
    assert math.isclose(model(images, tokens)["logit_scale"].item(), 100.0, rel_tol=1e-5)


def test_param_groups_carry_per_tower_learning_rates():
    cfg = config.load("demo_cpu", ["optim.lr.image=1e-3", "optim.lr.text=2e-3", "optim.lr.symbol=3e-3"])
    model = build_model(cfg.model, cfg.loss, with_symbol_tower=True)
    groups = param_groups(model, cfg)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"image": 1e-3, "text": 2e-3, "symbol": 3e-3, "temperature": cfg.optim.lr.temperature}
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == sum(1 for p in model.parameters() if p.requires_grad)
    temp = [g for g in groups if g["name"] == "temperature"]
    assert len(temp) == 1 and temp[0]["weight_decay"] == 0.0


def test_lock_image_tower_freezes_it_but_not_the_new_symbol_tower():
    cfg = config.load("demo_cpu", ["model.lock_image=true"])
    model = build_model(cfg.model, cfg.loss)
    assert not any(p.requires_grad for p in model.image.parameters())
    model.add_symbol_tower()
    assert all(p.requires_grad for p in model.symbol.parameters())
    assert "image" not in {g["name"] for g in param_groups(model, cfg)}


def test_warmup_cosine_schedule():
    fn = lr_lambda(total_steps=100, warmup_fraction=0.1, schedule="cosine")
    assert fn(0) == 0.1 and fn(9) == 1.0
    assert math.isclose(fn(55), 0.5, abs_tol=1e-9) and fn(100) == 0.0
    assert lr_lambda(10, 0.0, "constant")(7) == 1.0


def test_tokenizer_ships_by_name_and_tokenizes_like_open_clip():
    import pickle

    from open_clip.tokenizer import SimpleTokenizer

    texts = ["A picture of a round smooth galaxy", "A picture of an edge-on disk"]
    tokenizer = build_tokenizer(config.load("demo_cpu").model)
    shipped = pickle.dumps(tokenizer)
    assert len(shipped) < 1000  # the name, not open_clip's 2 MB of BPE tables (unpickled per Ray task)
    assert torch.equal(pickle.loads(shipped)(texts), SimpleTokenizer(context_length=32)(texts))
