"""AdamW (bias-corrected, decoupled weight decay), global-norm clipping, warmup + cosine schedule.

Update for each parameter w with gradient g at step t = 1, 2, ... (torch.optim.AdamW's order):
    w  -= lr * wd * w                           (decoupled decay, before the Adam step)
    m   = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    w  -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
Weight decay applies to matrices only (embeddings and projections), never to norm gains or biases.
"""
from __future__ import annotations

import math

import numpy as np


def decays(name: str, w: np.ndarray) -> bool:
    """Weight decay for 2-D weights; not for gains, biases."""
    return w.ndim >= 2


class AdamW:
    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, decay_filter=decays):
        self.lr, self.betas, self.eps, self.wd = lr, tuple(betas), eps, weight_decay
        self.t = 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.decay = {k: decay_filter(k, v) for k, v in params.items()}

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """One in-place update of `params` with `grads`."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        bc1 = 1.0 - b1 ** self.t
        bc2 = 1.0 - b2 ** self.t
        for k, w in params.items():
            g = grads[k]
            m, v = self.m[k], self.v[k]
            if self.wd and self.decay[k]:
                w *= (1.0 - lr * self.wd)
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            denom = np.sqrt(v / bc2)
            denom += self.eps
            w -= (lr / bc1) * m / denom

    def state_dict(self) -> dict:
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, st: dict) -> None:
        self.t = int(st["t"])
        for k in self.m:
            self.m[k][...] = st["m"][k]
            self.v[k][...] = st["v"][k]


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
    total = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
    if max_norm and max_norm > 0 and total > max_norm:
        s = max_norm / (total + 1e-6)
        for g in grads.values():
            g *= s
    return total


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup over `warmup` steps to base_lr, then cosine decay to min_lr at step `total`.
    `step` counts from 0 (the lr used for the first update is base_lr / warmup)."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * frac))
