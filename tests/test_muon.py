"""
MuonAdamW contracts, for both backends/muon_torch.py (PyTorch) and backends/muon_mlx.py (MLX):
- each step equals a float64 NumPy reference written from the formulas of karpathy/autoresearch's
  train.py (max relative error <= 1e-5 in float32), for tall, wide and square Muon groups and for
  each AdamW group kind, over one step and over several steps with a changing schedule;
- PyTorch and MLX agree with each other to the same tolerance;
- set_schedule reaches every group; a compiled MLX step sees it and equals the uncompiled one;
- parameters keep their dtype (bf16 stays bf16) while optimizer state is float32.
"""

from functools import partial

import numpy as np
import pytest

from conftest import need

need("mlx")  # before the imports below: a framework that is not installed skips this module, naming its extra
need("torch")

import mlx.core as mx
import mlx.nn as nn
import torch
from mlx.utils import tree_flatten

from backends import muon_mlx, muon_torch

TOL = 1e-5

# The original's coefficients, copied by hand so that a typo in either module fails a test.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]

# ---------------------------------------------------------------------------
# Float64 reference, written from the formulas
# ---------------------------------------------------------------------------

def ref_adamw(p, g, m, v, t, lr, betas, eps, wd):
    b1, b2 = betas
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = v + (1 - b2) * (g * g - v)
    p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p, m, v


def ref_muon(P, G, buf, buf2, lr, momentum, wd, beta2, ns_steps):
    n, rows, cols = P.shape
    buf = buf + (1 - momentum) * (G - buf)
    g = G + momentum * (buf - G)
    X = g / (np.sqrt((g * g).sum(axis=(1, 2), keepdims=True)) * 1.02 + 1e-6)
    for a, b, c in POLAR_EXPRESS[:ns_steps]:
        XT = X.transpose(0, 2, 1)
        if rows > cols:
            A = XT @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ XT
            X = a * X + (b * A + c * A @ A) @ X
    red = 2 if rows >= cols else 1
    v_mean = (X * X).mean(axis=red, keepdims=True)
    red_size = X.shape[red]
    v_norm = np.sqrt(v_mean.sum(axis=(1, 2), keepdims=True) * red_size)
    buf2 = buf2 + (1 - beta2) * (v_mean - buf2)
    step = 1 / np.sqrt(np.maximum(buf2, 1e-10))
    v_norm_new = np.sqrt((v_mean * red_size * step ** 2).sum(axis=(1, 2), keepdims=True))
    u = X * step * (v_norm / np.maximum(v_norm_new, 1e-10))
    lr_eff = lr * np.sqrt(max(1.0, rows / cols))
    mask = (u * P) >= 0
    return P - lr_eff * u - lr_eff * wd * P * mask, buf, buf2

# ---------------------------------------------------------------------------
# The problem: one group of each kind, random parameters and gradients
# ---------------------------------------------------------------------------

ADAM = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
MUON = dict(kind="muon", momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.2)
GROUPS = [  # (hyperparameters, {name: (shape, init scale)}); names are flat so they double as MLX paths
    (dict(ADAM, lr=0.004), {"lm_head": ((96, 32), 0.01)}),
    (dict(ADAM, lr=0.6, weight_decay=0.1), {"wte": ((96, 32), 1.0)}),  # nonzero wd to test its formula
    (dict(ADAM, lr=0.5, betas=(0.96, 0.95)), {"x0_lambdas": ((4,), 0.1)}),
    (dict(MUON, lr=0.05), {f"tall{i}": ((64, 32), 0.1) for i in range(2)}),
    (dict(MUON, lr=0.05), {f"wide{i}": ((32, 64), 0.1) for i in range(3)}),
    (dict(MUON, lr=0.05), {f"square{i}": ((48, 48), 0.1) for i in range(2)}),
]
SCHEDULE = [(1.0, 0.85, 0.2), (0.6, 0.9, 0.1), (0.3, 0.95, 0.05)]  # (lr multiplier, momentum, muon wd)


def make_problem(num_steps, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {name: spec for _, named in GROUPS for name, spec in named.items()}
    params = {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, (shape, scale) in shapes.items()}
    grads = [{name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in shapes.items()}
             for _ in range(num_steps)]
    return params, grads


def param_groups(to_param):
    return [dict(hyper, params=[to_param(name) for name in named]) for hyper, named in GROUPS]


def bf16(x):
    """Round to the nearest bfloat16 (ties to even), returned as float64."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32).astype(np.float64)


def run_reference(params, grads, schedule, bf16_names=()):
    """Returns the parameters (float64) after each step. Parameters named in bf16_names are stored
    in bf16 between steps, and their gradients arrive in bf16, as in the optimizers under test."""
    store = lambda p: {k: bf16(v) if k in bf16_names else v.astype(np.float64) for k, v in p.items()}
    p, state, history = store(params), {}, []
    for step, g in enumerate(grads):
        g = store(g)
        for hyper, named in GROUPS:
            names = list(named)
            lr, momentum, wd = hyper["lr"], hyper.get("momentum"), hyper["weight_decay"]
            if schedule:
                lr_mult, sched_momentum, sched_wd = schedule[step]
                lr = lr * lr_mult
                if hyper["kind"] == "muon":
                    momentum, wd = sched_momentum, sched_wd
            if hyper["kind"] == "adamw":
                for k in names:
                    m, v = state.get(k, (0.0, 0.0))
                    p[k], m, v = ref_adamw(p[k], g[k], m, v, step + 1, lr, hyper["betas"], hyper["eps"], wd)
                    state[k] = (m, v)
            else:
                P, G = np.stack([p[k] for k in names]), np.stack([g[k] for k in names])
                buf, buf2 = state.get(names[0], (0.0, 0.0))
                P, buf, buf2 = ref_muon(P, G, buf, buf2, lr, momentum, wd, hyper["beta2"], hyper["ns_steps"])
                state[names[0]] = (buf, buf2)
                p.update(zip(names, P))
        p = store(p)
        history.append(dict(p))
    return history


def run_torch(params, grads, schedule, bf16_names=()):
    dtype = lambda k: torch.bfloat16 if k in bf16_names else torch.float32
    tensors = {k: torch.nn.Parameter(torch.tensor(v, dtype=dtype(k))) for k, v in params.items()}
    opt = muon_torch.MuonAdamW(param_groups(tensors.__getitem__))
    history = []
    for step, g in enumerate(grads):
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k], dtype=t.dtype)
        if schedule:
            opt.set_schedule(*schedule[step])
        opt.step()
        history.append({k: t.detach().double().numpy() for k, t in tensors.items()})
    return history, tensors, opt


class ParamBag(nn.Module):
    """An MLX module whose parameters are the given arrays, under their (flat) names."""
    def __init__(self, arrays):
        super().__init__()
        for k, v in arrays.items():
            self[k] = v


def mlx_to_numpy(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


def run_mlx(params, grads, schedule, bf16_names=()):
    dtype = lambda k: mx.bfloat16 if k in bf16_names else mx.float32
    model = ParamBag({k: mx.array(v).astype(dtype(k)) for k, v in params.items()})
    opt = muon_mlx.MuonAdamW(param_groups(str))
    history = []
    for step, g in enumerate(grads):
        if schedule:
            opt.set_schedule(*schedule[step])
        opt.update(model, {k: mx.array(v).astype(dtype(k)) for k, v in g.items()})
        mx.eval(model.parameters(), opt.state)
        history.append({k: mlx_to_numpy(v) for k, v in tree_flatten(model.parameters())})
    return history, model, opt


def rel_err(got, want, start):
    """Error of a step relative to the step's size: max|Δgot - Δwant| / max|Δwant|.
    Measured on the change from the starting point, so a small learning rate can't hide a wrong update."""
    delta_want = want - start
    return np.abs((got - start) - delta_want).max() / np.abs(delta_want).max()


def assert_close(got_history, want_history, params):
    for step, (got, want) in enumerate(zip(got_history, want_history)):
        for k in want:
            err = rel_err(got[k], want[k], params[k].astype(np.float64))
            assert err <= TOL, f"step {step + 1}, {k}: relative error {err:.2e} > {TOL:.0e}"

# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def test_coefficients_match_the_original():
    assert muon_torch.POLAR_EXPRESS_COEFFS == POLAR_EXPRESS
    assert muon_mlx.POLAR_EXPRESS_COEFFS == POLAR_EXPRESS


@pytest.mark.parametrize("num_steps", [1, 3])
@pytest.mark.parametrize("run", [run_torch, run_mlx], ids=["torch", "mlx"])
def test_matches_float64_reference(run, num_steps):
    params, grads = make_problem(num_steps)
    schedule = SCHEDULE if num_steps > 1 else None  # one step uses the constructor's values
    want = run_reference(params, grads, schedule)
    assert_close(run(params, grads, schedule)[0], want, params)


def test_torch_matches_mlx():
    params, grads = make_problem(3, seed=1)
    assert_close(run_torch(params, grads, SCHEDULE)[0], run_mlx(params, grads, SCHEDULE)[0], params)


@pytest.mark.parametrize("run", [run_torch, run_mlx], ids=["torch", "mlx"])
def test_set_schedule_reaches_every_group(run):
    params, grads = make_problem(2)
    # lr multiplier 0 must freeze every parameter: a group the schedule misses would still move
    history, _, opt = run(params, grads, [(1.0, 0.85, 0.2), (0.0, 0.9, 0.1)])
    for k in params:
        assert not np.array_equal(history[0][k], params[k]), f"{k} did not move at lr multiplier 1"
        assert np.array_equal(history[1][k], history[0][k]), f"{k} moved at lr multiplier 0"
    opt.set_schedule(0.25, 0.93, 0.07)
    for i, group in enumerate(opt.param_groups):
        assert group["lr"] == group["initial_lr"] * 0.25
        if group["kind"] == "muon":
            assert (group["momentum"], group["weight_decay"]) == (0.93, 0.07)
        if run is run_mlx:  # the arrays a compiled step reads
            state = opt.state[i]
            assert state["lr"].item() == pytest.approx(group["lr"])
            if group["kind"] == "muon":
                assert state["momentum"].item() == pytest.approx(0.93)
                assert state["weight_decay"].item() == pytest.approx(0.07)


BF16_NAMES = ("wte", "square0", "square1")  # a bf16 embedding and a bf16 Muon group


def assert_bf16_matches_reference(history, params, grads):
    """bf16 parameters: every element within one bf16 ulp (<= 2^-7 relative) of the reference, itself
    stored in bf16, plus the float32 tolerance for elements near zero. The float32 tests pin the math;
    this one catches dtype mistakes (bf16 state, double rounding, an update that never lands)."""
    want = run_reference(params, grads, SCHEDULE[:2], BF16_NAMES)
    for step, (got, ref) in enumerate(zip(history, want)):
        for k in BF16_NAMES:
            slack = 2 ** -7 * np.abs(ref[k]) + TOL * np.abs(ref[k] - bf16(params[k])).max()
            assert np.all(np.abs(got[k] - ref[k]) <= slack), f"step {step + 1}, {k}"
            assert not np.array_equal(got[k], bf16(params[k])), f"step {step + 1}, {k} did not move"


def test_torch_bf16_params_stay_bf16_and_lerp_never_sees_half(monkeypatch):
    lerp_dtypes = []
    real_lerp = torch.Tensor.lerp_
    def spy(self, *args, **kwargs):
        lerp_dtypes.append(self.dtype)
        return real_lerp(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "lerp_", spy)

    params, grads = make_problem(2)
    history, tensors, opt = run_torch(params, grads, SCHEDULE[:2], BF16_NAMES)
    assert lerp_dtypes and set(lerp_dtypes) == {torch.float32}
    for k, t in tensors.items():
        assert t.dtype == (torch.bfloat16 if k in BF16_NAMES else torch.float32), k
    for state in opt.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32, name
    assert_bf16_matches_reference(history, params, grads)


def test_mlx_bf16_params_stay_bf16_and_state_is_float32():
    params, grads = make_problem(2)
    history, model, opt = run_mlx(params, grads, SCHEDULE[:2], BF16_NAMES)
    for k, v in tree_flatten(model.parameters()):
        assert v.dtype == (mx.bfloat16 if k in BF16_NAMES else mx.float32), k
    for path, value in tree_flatten(opt.state):
        assert value.dtype == mx.float32, path
    assert_bf16_matches_reference(history, params, grads)


def test_mlx_checks_every_parameter_is_in_exactly_one_group():
    params, _ = make_problem(1)
    model = ParamBag({k: mx.array(v) for k, v in params.items()})
    groups = param_groups(str)
    missing = muon_mlx.MuonAdamW([dict(g, params=[p for p in g["params"] if p != "wte"]) for g in groups])
    with pytest.raises(AssertionError, match="in no param group: wte"):
        missing.init(model)
    twice = muon_mlx.MuonAdamW(groups + [dict(groups[0])])
    with pytest.raises(AssertionError, match="'lm_head' is in param groups 0 and 6"):
        twice.init(model)
    unknown = muon_mlx.MuonAdamW(groups + [dict(groups[0], params=["nope"])])
    with pytest.raises(AssertionError, match="'nope', which is not a trainable model parameter"):
        unknown.init(model)

# ---------------------------------------------------------------------------
# A compiled MLX training step includes the optimizer and follows the schedule
# ---------------------------------------------------------------------------

class TinyLM(nn.Module):
    def __init__(self, vocab=16, dim=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.h = [dict(up=nn.Linear(dim, 2 * dim, bias=False), down=nn.Linear(2 * dim, dim, bias=False))
                  for _ in range(2)]
        self.lambdas = mx.ones((2,))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def __call__(self, idx):
        x = self.wte(idx).astype(mx.float32)
        for lam, block in zip(self.lambdas, self.h):
            x = x + lam * block["down"](nn.relu(block["up"](x)))
        return self.lm_head(x)


def tiny_lm_and_optimizer():
    mx.random.seed(0)
    model = TinyLM()
    model.wte.weight = model.wte.weight.astype(mx.bfloat16)  # embeddings are bf16, as in the trainers
    groups = [
        dict(ADAM, lr=0.004, params=["lm_head.weight"]),
        dict(ADAM, lr=0.6, params=["wte.weight"]),
        dict(ADAM, lr=0.5, betas=(0.96, 0.95), params=["lambdas"]),
        dict(MUON, lr=0.05, params=["h.0.up.weight", "h.1.up.weight"]),
        dict(MUON, lr=0.05, params=["h.0.down.weight", "h.1.down.weight"]),
    ]
    return model, muon_mlx.MuonAdamW(groups)


def test_compiled_mlx_step_follows_schedule_and_equals_uncompiled():
    def loss_fn(model, x, y):
        return nn.losses.cross_entropy(model(x), y, reduction="mean")

    eager_model, eager_opt = tiny_lm_and_optimizer()
    model, opt = tiny_lm_and_optimizer()
    opt.init(model)
    state = [model.state, opt.state]

    traces = []

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled_step(x, y):
        traces.append(1)  # Python runs only while MLX traces the function
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    def eager_step(x, y):
        loss, grads = nn.value_and_grad(eager_model, loss_fn)(eager_model, x, y)
        eager_opt.update(eager_model, grads)
        return loss

    params_of = lambda m: {k: mlx_to_numpy(v) for k, v in tree_flatten(m.trainable_parameters())}
    x = mx.random.randint(0, 16, (4, 6))
    y = mx.random.randint(0, 16, (4, 6))
    start, compiled, eager = params_of(model), [], []
    for values in [(1.0, 0.85, 0.2), (0.0, 0.9, 0.1), (0.5, 0.95, 0.0)]:
        opt.set_schedule(*values)
        eager_opt.set_schedule(*values)
        compiled_step(x, y)
        eager_step(x, y)
        mx.eval(model.state, opt.state, eager_model.state, eager_opt.state)
        compiled.append(params_of(model))
        eager.append(params_of(eager_model))
    assert_close(compiled, eager, start)
    for k in start:  # the compiled step read each new lr: it moved, stood still at multiplier 0, moved again
        assert not np.array_equal(compiled[0][k], start[k]), f"{k} did not move at lr multiplier 1"
        assert np.array_equal(compiled[1][k], compiled[0][k]), f"{k} moved at lr multiplier 0"
        assert not np.array_equal(compiled[2][k], compiled[1][k]), f"{k} did not move at lr multiplier 0.5"
    assert len(traces) == 1, "the schedule must not force a recompile"
    assert model.wte.weight.dtype == mx.bfloat16
