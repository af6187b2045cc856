"""Optimizers whose step costs the same however many users a model holds.

A per-user table (the individual model's offsets o_u, the cluster model's mixture logits) gets a
sparse gradient when its user model has ``sparse_rows`` set (only the batch's rows), and is
updated lazily by ``LazyAdam``: Adam moments and updates for those rows only (as
``torch.optim.SparseAdam`` and TensorFlow's LazyAdam, with AdamW's arithmetic). Rows absent from a
batch then keep their value (dense AdamW would keep moving them along their old momentum). Every other parameter keeps the usual dense optimizer;
``CombinedOptimizer`` presents the two as one ``torch.optim.Optimizer`` to ``transformers.Trainer``
(learning-rate schedules, checkpoints).
"""

from __future__ import annotations

import torch


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped together. ``param_groups`` lists every
    part's groups (the same dictionaries, so a learning-rate schedule reaches all of them);
    ``state_dict`` holds each part's state."""

    def __init__(self, *optimizers: torch.optim.Optimizer):  # noqa: D107 - no Optimizer.__init__: the parts hold the state
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers")
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError(f"optimizer state: expected {len(self.optimizers)} parts (dense and lazy user rows), got "
                             f"{'none' if not isinstance(parts, list) else len(parts)}: a checkpoint of another "
                             "user_rows_update setting?")
        for o, s in zip(self.optimizers, parts):
            o.load_state_dict(s)

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


class LazyAdam(torch.optim.Optimizer):
    """Adam for parameters with sparse gradients (per-user tables): the moments and the parameter
    are updated at the rows the gradient holds, with AdamW's arithmetic (bias-corrected moments,
    ``eps`` added to sqrt of the corrected second moment; no weight decay), so a row present in
    every step follows AdamW exactly. The step count is the optimizer's (global), as in
    ``torch.optim.SparseAdam`` and TensorFlow's LazyAdam. Dense gradients are refused."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise ValueError("LazyAdam takes sparse gradients (a per-user table with sparse_rows set)")
                grad = p.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                m = state["exp_avg"][rows].mul_(b1).add_(values, alpha=1 - b1)
                v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(values, values, value=1 - b2)
                state["exp_avg"][rows], state["exp_avg_sq"][rows] = m, v
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p[rows] = p[rows] - group["lr"] * (m / (1 - b1 ** t)) / denom
        return loss


def grad_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient: a sparse gradient's (coalesced) values, a dense one as it is."""
    return grad.coalesce().values() if grad.is_sparse else grad


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) for parameters whose gradients may be sparse:
    sparse gradients are coalesced (duplicate rows summed) and scaled like dense ones."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    norms = [torch.linalg.vector_norm(grad_values(p.grad).float()) for p in params]
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad._values().mul_(coef.to(p.grad.device, p.grad.dtype))
        else:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total
