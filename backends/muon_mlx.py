"""
MuonAdamW for MLX: the same optimizer as backends/muon_torch.py (karpathy/autoresearch's train.py),
in MLX idiom. Muon for the 2-D matrices of the transformer blocks, grouped by shape; AdamW for the rest.

param_groups use the PyTorch format, except "params" holds parameter paths as produced by
tree_flatten(model.trainable_parameters()), e.g. "transformer.h.0.attn.c_q.weight".

`state` is a list (one dict per group) holding only mx.arrays: moments, step counters, and the
scheduled hyperparameters (lr for every group, momentum and weight_decay for Muon groups) as 0-d
float32 arrays. set_schedule replaces those arrays inside the list, so a training step compiled with
    mx.compile(step, inputs=[model.state, optimizer.state], outputs=[model.state, optimizer.state])
can include optimizer.update(...) and still see each step's schedule without recompiling.
init(model) checks the groups and builds the state; update() calls it when needed, but calling it
before mx.compile gives the compiled step its full state at once (else the first call traces twice).

All optimizer math is float32, Newton-Schulz included, on every MLX device: bf16 Newton-Schulz produced NaNs on
Metal (in another MLX port), and on MLX's CUDA build, where the original iterates in bf16, it ended higher in
val_bpb at equal tokens (docs/measurements.md). Each parameter is written back in its own dtype.
"""

import math

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from backends.polar_express import POLAR_EXPRESS_COEFFS

# ---------------------------------------------------------------------------
# Steps (pure functions: arrays in, new arrays out)
# ---------------------------------------------------------------------------

def lerp(start, end, weight):
    return start + weight * (end - start)


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    grad = grad.astype(mx.float32)
    new_p = p.astype(mx.float32) * (1 - lr * wd)
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = lerp(exp_avg_sq, grad * grad, 1 - beta2)
    bias1 = 1 - mx.power(beta1, step)
    bias2 = 1 - mx.power(beta2, step)
    new_p = new_p - (lr / bias1) * exp_avg / (mx.sqrt(exp_avg_sq / bias2) + eps)
    return new_p.astype(p.dtype), exp_avg, exp_avg_sq


def muon_step(grads, params, momentum_buffer, second_buffer, momentum, lr, wd, beta2, ns_steps):
    # grads, params: float32 stacks (n, rows, cols)
    rows, cols = grads.shape[-2:]
    # Nesterov momentum
    momentum_buffer = lerp(momentum_buffer, grads, 1 - momentum)
    g = lerp(grads, momentum_buffer, momentum)
    # Polar Express: push every singular value towards 1 (an approximate orthogonalisation)
    X = g / (mx.sqrt(mx.sum(g * g, axis=(-2, -1), keepdims=True)) * 1.02 + 1e-6)
    tall = rows > cols  # iterate on the smaller Gram matrix
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        XT = mx.swapaxes(X, -1, -2)
        A = XT @ X if tall else X @ XT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    g = X
    # NorMuon: per-row (or per-column) second moment, rescaled so the update keeps its Frobenius norm
    red_dim = -1 if rows >= cols else -2
    red_size = g.shape[red_dim]
    v_mean = mx.mean(g * g, axis=red_dim, keepdims=True)
    v_norm = mx.sqrt(mx.sum(v_mean, axis=(-2, -1), keepdims=True) * red_size)
    second_buffer = lerp(second_buffer, v_mean, 1 - beta2)
    step_size = mx.rsqrt(mx.maximum(second_buffer, 1e-10))
    v_norm_new = mx.sqrt(mx.sum(v_mean * red_size * step_size * step_size, axis=(-2, -1), keepdims=True))
    g = g * (step_size * (v_norm / mx.maximum(v_norm_new, 1e-10)))
    # Cautious weight decay: only decay where the update and the weight agree in sign
    mask = (g * params) >= 0
    params = params - (lr * g + lr * wd * params * mask)
    return params, momentum_buffer, second_buffer

# ---------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------

def scalar(value):
    return mx.array(value, dtype=mx.float32)


class MuonAdamW:
    """param_groups: dicts with kind="adamw" (params, lr, betas, eps, weight_decay) or
    kind="muon" (params of one 2-D shape, lr, momentum, ns_steps, beta2, weight_decay)."""

    def __init__(self, param_groups):
        self.param_groups = []
        for group in param_groups:
            kind = group.get("kind")
            assert kind in ("adamw", "muon"), f"param group kind must be 'adamw' or 'muon', got {kind!r}"
            self.param_groups.append(dict(group, params=list(group["params"]), initial_lr=group["lr"]))
        self.state = []

    def init(self, model):
        """Check that every trainable parameter is in exactly one group, then build zeroed state."""
        params = dict(tree_flatten(model.trainable_parameters()))
        seen = {}
        for i, group in enumerate(self.param_groups):
            for path in group["params"]:
                assert path in params, f"param group {i} names {path!r}, which is not a trainable model parameter"
                assert path not in seen, f"parameter {path!r} is in param groups {seen[path]} and {i}"
                seen[path] = i
        missing = [path for path in params if path not in seen]
        assert not missing, f"model parameters in no param group: {', '.join(missing)}"

        self.state.clear()  # in place: a compiled step may already hold this list
        for group in self.param_groups:
            shapes = [params[path].shape for path in group["params"]]
            if group["kind"] == "adamw":
                self.state.append(dict(
                    lr=scalar(group["lr"]),
                    step=[scalar(0.0) for _ in shapes],
                    exp_avg=[mx.zeros(shape, dtype=mx.float32) for shape in shapes],
                    exp_avg_sq=[mx.zeros(shape, dtype=mx.float32) for shape in shapes],
                ))
            else:
                assert len(set(map(tuple, shapes))) == 1 and len(shapes[0]) == 2, \
                    f"a muon group needs 2-D parameters of one shape, got shapes {shapes}"
                n, (rows, cols) = len(shapes), shapes[0]
                self.state.append(dict(
                    lr=scalar(group["lr"]),
                    momentum=scalar(group["momentum"]),
                    weight_decay=scalar(group["weight_decay"]),
                    momentum_buffer=mx.zeros((n, rows, cols), dtype=mx.float32),
                    second_buffer=mx.zeros((n, rows, 1) if rows >= cols else (n, 1, cols), dtype=mx.float32),
                ))
        mx.eval(self.state)

    def set_schedule(self, lr_multiplier, muon_momentum, muon_weight_decay):
        """Called once per training step: LR for every group, momentum and weight decay for Muon."""
        for i, group in enumerate(self.param_groups):
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum
                group["weight_decay"] = muon_weight_decay
            if self.state:  # before init() there are no arrays yet; init() reads the group values
                self.state[i]["lr"] = scalar(group["lr"])
                if group["kind"] == "muon":
                    self.state[i]["momentum"] = scalar(muon_momentum)
                    self.state[i]["weight_decay"] = scalar(muon_weight_decay)

    def update(self, model, grads):
        """Apply one step with grads (the tree from nn.value_and_grad) and write the new parameters."""
        if not self.state:
            self.init(model)
        params = dict(tree_flatten(model.trainable_parameters()))
        grads = dict(tree_flatten(grads))
        new_params = {}
        for group, state in zip(self.param_groups, self.state):
            paths = group["params"]
            if group["kind"] == "adamw":
                beta1, beta2 = group["betas"]
                for i, path in enumerate(paths):
                    state["step"][i] = state["step"][i] + 1
                    p, state["exp_avg"][i], state["exp_avg_sq"][i] = adamw_step(
                        params[path], grads[path], state["exp_avg"][i], state["exp_avg_sq"][i], state["step"][i],
                        state["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                    new_params[path] = p
            else:
                rows, cols = params[paths[0]].shape
                lr = state["lr"] * math.sqrt(max(1.0, rows / cols))
                stacked, state["momentum_buffer"], state["second_buffer"] = muon_step(
                    mx.stack([grads[path] for path in paths]).astype(mx.float32),
                    mx.stack([params[path] for path in paths]).astype(mx.float32),
                    state["momentum_buffer"], state["second_buffer"],
                    state["momentum"], lr, state["weight_decay"], group["beta2"], group["ns_steps"])
                new_params.update((path, stacked[i].astype(params[path].dtype)) for i, path in enumerate(paths))
        # Rebuild the model's own tree: tree_unflatten would read the dict keys "1", "3" of value_embeds as list indices
        model.update(tree_map_with_path(lambda path, p: new_params[path], model.trainable_parameters()))
