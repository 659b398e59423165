"""The inner optimizers a manifest may name (an allow-list: nothing else is ever constructed) and its schedule.

``sgd``, ``adam`` and ``adamw`` are torch's own. ``lamb`` is written here because torch has none: it is
AdamW whose update is scaled, per tensor, by the trust ratio ``||w|| / ||update||`` (You et al., "Large
Batch Optimization for Deep Learning: Training BERT in 76 minutes", arXiv 1904.00962, Algorithm 2), which
keeps very large collaborative batches stable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from volunteer.run.manifest import OptimizerSpec

__all__ = ["Lamb", "build_optimizer", "build_scheduler"]


class Lamb(torch.optim.Optimizer):
    """LAMB (arXiv 1904.00962): Adam moments with decoupled weight decay and a per-tensor trust ratio."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_trust_ratio: float = 10.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "max_trust_ratio": max_trust_ratio,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1 ** state["step"])
                v_hat = exp_avg_sq / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(param, alpha=group["weight_decay"])
                weight_norm = float(param.norm())
                update_norm = float(update.norm())
                trust = 1.0
                if weight_norm > 0 and update_norm > 0:
                    trust = min(weight_norm / update_norm, group["max_trust_ratio"])
                param.add_(update, alpha=-group["lr"] * trust)
        return loss


def build_optimizer(spec: OptimizerSpec, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names, over ``params`` (the spec was validated when the manifest was built)."""
    p = spec.params
    lr = float(p["lr"])
    if spec.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(p["momentum"]),
            nesterov=bool(p["nesterov"]),
            weight_decay=float(p["weight_decay"]),
        )
    betas = (float(p["beta1"]), float(p["beta2"]))
    eps, weight_decay = float(p["eps"]), float(p["weight_decay"])
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if spec.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if spec.name == "lamb":
        return Lamb(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise AssertionError(f"optimizer {spec.name!r} is in the allow-list but has no builder")


def build_scheduler(spec: OptimizerSpec, optimizer: torch.optim.Optimizer) -> LambdaLR:
    """A scheduler whose step count is the collaborative epoch: call ``step()`` once per global step."""
    return LambdaLR(optimizer, spec.schedule.factor)
