"""AdamW vs torch.optim.AdamW, clipping, schedule, gradient accumulation."""
import numpy as np
import pytest

from plainlm.train.model import ArchConfig, backward, forward, init_params
from plainlm.train.optim import AdamW, clip_grad_norm, lr_at

torch = pytest.importorskip("torch")


def test_adamw_matches_torch_over_10_steps():
    rng = np.random.default_rng(0)
    P = {"w": rng.normal(size=(5, 4)).astype(np.float32), "g": rng.normal(size=(4,)).astype(np.float32)}
    T = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in P.items()}
    opt = AdamW(P, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    topt = torch.optim.AdamW([{"params": [T["w"]], "weight_decay": 0.1},
                              {"params": [T["g"]], "weight_decay": 0.0}], lr=0.01, betas=(0.9, 0.95), eps=1e-8)
    for step in range(10):
        grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in P.items()}
        lr = lr_at(step, 0.01, 3, 10)
        opt.step(P, grads, lr)
        for grp in topt.param_groups:
            grp["lr"] = lr
        for k in T:
            T[k].grad = torch.tensor(grads[k])
        topt.step()
        for k in P:
            assert np.allclose(P[k], T[k].detach().numpy(), rtol=1e-5, atol=1e-6), (step, k)


def test_clip_matches_torch():
    rng = np.random.default_rng(1)
    G = {"a": rng.normal(size=(3, 3)).astype(np.float32), "b": rng.normal(size=(7,)).astype(np.float32)}
    ts = [torch.nn.Parameter(torch.zeros(v.shape)) for v in G.values()]
    for t, v in zip(ts, G.values()):
        t.grad = torch.tensor(v)
    tn = torch.nn.utils.clip_grad_norm_(ts, 1.0)
    n = clip_grad_norm(G, 1.0)
    assert abs(n - tn.item()) < 1e-5
    for t, v in zip(ts, G.values()):
        assert np.allclose(v, t.grad.numpy(), atol=1e-6)


def test_schedule():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(500, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


def test_gradient_accumulation_equals_big_batch():
    """Two micro-batches with dloss = 1/2 each give the gradient of their mean loss (equal sizes)."""
    cfg = ArchConfig(vocab_size=20, dim=16, n_layers=1, n_heads=2, context_length=8)
    P = init_params(cfg, 0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 20, (4, 8))
    tg = rng.integers(0, 20, (4, 8))
    loss, c = forward(cfg, P, ids, tg)
    G = backward(cfg, P, c)
    acc = None
    for half in (slice(0, 2), slice(2, 4)):
        _, c = forward(cfg, P, ids[half], tg[half])
        acc = backward(cfg, P, c, acc, dloss=0.5)
    for k in G:
        assert np.allclose(G[k], acc[k], rtol=1e-4, atol=1e-7), k
