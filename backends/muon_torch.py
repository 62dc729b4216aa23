"""
MuonAdamW for PyTorch (MPS, CUDA, CPU): the optimizer of karpathy/autoresearch's train.py.
Muon (Nesterov momentum -> Polar Express orthogonalisation -> NorMuon variance reduction -> cautious
weight decay) for the 2-D matrices of the transformer blocks, grouped by shape; AdamW for the rest.

Differences from the original, all numerical hygiene, none in the math:
- Optimizer state is always float32 and each update is computed in float32, then written back to the
  parameter in its own dtype (bf16 embeddings stay bf16). This also keeps lerp_ off half-precision
  tensors, which PyTorch's MPS backend gets wrong.
- Newton-Schulz runs in bf16 only on CUDA (see CUDA_NS_DTYPE).
- The steps run eagerly everywhere: on CUDA, compiling them cost far more at every edit that changes the
  model's shapes than the ~1% of a step it saved (docs/measurements.md).

The training loop calls set_schedule(...) once per step; it reaches every group.
"""

import math

import torch

from backends.polar_express import POLAR_EXPRESS_COEFFS

# Newton-Schulz dtype on CUDA: bf16 as the original (tensor cores, and the iteration tolerates it there).
# Everywhere else float32: CPUs have no fast bf16 matmul, and on Apple GPUs half-precision paths have
# bitten us (the MLX port's bf16 Newton-Schulz made NaNs; MPS lerp_ is wrong in half). Tests set this to
# torch.float32 to compare against a float64 reference.
CUDA_NS_DTYPE = torch.bfloat16

# ---------------------------------------------------------------------------
# Steps (plain tensor functions, run eagerly)
# ---------------------------------------------------------------------------

def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    grad = grad.float()
    new_p = p.float() * (1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    new_p = new_p - (lr / bias1) * exp_avg / ((exp_avg_sq / bias2).sqrt() + eps)
    p.copy_(new_p)


def muon_step(grads, params, momentum_buffer, second_buffer, momentum, lr, wd, beta2,
              ns_steps, red_dim, ns_dtype):
    # grads, params: float32 stacks (n, rows, cols) that this function may overwrite
    # Nesterov momentum
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)
    # Polar Express: push every singular value towards 1 (an approximate orthogonalisation)
    X = g.to(ns_dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = g.size(-2) > g.size(-1)  # iterate on the smaller Gram matrix
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    g = X.float()
    # NorMuon: per-row (or per-column) second moment, rescaled so the update keeps its Frobenius norm
    v_mean = g.square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_buffer.lerp_(v_mean, 1 - beta2)
    step_size = second_buffer.clamp_min(1e-10).rsqrt()
    v_norm_new = (v_mean * red_size * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10)))
    # Cautious weight decay: only decay where the update and the weight agree in sign
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------

class MuonAdamW(torch.optim.Optimizer):
    """param_groups: dicts with kind="adamw" (params, lr, betas, eps, weight_decay) or
    kind="muon" (params of one 2-D shape, lr, momentum, ns_steps, beta2, weight_decay)."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            kind = group.get("kind")
            assert kind in ("adamw", "muon"), f"param group kind must be 'adamw' or 'muon', got {kind!r}"
            if kind == "muon":
                shapes = {tuple(p.shape) for p in group["params"]}
                assert len(shapes) == 1 and len(next(iter(shapes))) == 2, \
                    f"a muon group needs 2-D parameters of one shape, got shapes {sorted(shapes)}"
            group["initial_lr"] = group["lr"]

    def set_schedule(self, lr_multiplier, muon_momentum, muon_weight_decay):
        """Called once per training step: LR for every group, momentum and weight decay for Muon."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay

    def _step_adamw(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"],
                       beta1, beta2, group["eps"], group["weight_decay"])

    def _step_muon(self, group):
        params = group["params"]
        have_grad = [p.grad is not None for p in params]
        if not any(have_grad):
            return
        assert all(have_grad), "a muon group needs gradients for all of its parameters or for none"
        p = params[0]
        rows, cols = p.shape
        state = self.state[p]  # the whole group's stacked state lives on its first parameter
        if not state:
            state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=torch.float32, device=p.device)
            second_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(second_shape, dtype=torch.float32, device=p.device)
        red_dim = -1 if rows >= cols else -2
        grads = torch.stack([q.grad for q in params]).float()
        stacked = torch.stack(params).float()
        muon_step(grads, stacked, state["momentum_buffer"], state["second_momentum_buffer"], group["momentum"],
                  group["lr"] * math.sqrt(max(1.0, rows / cols)), group["weight_decay"], group["beta2"],
                  group["ns_steps"], red_dim, CUDA_NS_DTYPE if p.device.type == "cuda" else torch.float32)
        torch._foreach_copy_(params, list(stacked.unbind(0)))  # casts back to each parameter's dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                self._step_muon(group)
