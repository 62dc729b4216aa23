"""train.py and train_mlx.py are one experiment: the same sizes, init, outputs, training curve and metric.
Both run on CPU in float32 here, so any difference is a difference in the programs, not in rounding."""
import ast
import math
import re
from statistics import NormalDist

import numpy as np
import pytest

from conftest import main_block, need

need("mlx")  # before the imports below: a framework that is not installed skips this module, naming its extra
need("torch")

import mlx.core as mx
import torch
from mlx.utils import tree_flatten

import prepare
from backends import memory
import train
import train_mlx
from corpus import reference_bpb
from tests.compute_dtype import norm_probe
from tests.convert import mlx_to_torch, torch_to_mlx

TINY = dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def make_pair(config_kwargs, seed=0):
    torch.manual_seed(seed)
    tm = train.GPT(train.GPTConfig(**config_kwargs))
    tm.init_weights(dtype=torch.float32)
    mm = train_mlx.GPT(train_mlx.GPTConfig(**config_kwargs))
    mm.init_weights(dtype=mx.float32)
    torch_to_mlx(tm, mm)
    return tm, mm


def markov_batches(n, B, T, vocab, seed=0):
    """Token streams with learnable structure (a sparse random Markov chain), so the loss curve moves."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, (vocab, 4))
    batches = []
    for _ in range(n):
        rows = np.empty((B, T + 1), dtype=np.int64)
        rows[:, 0] = rng.integers(0, vocab, B)
        for t in range(T):
            rows[:, t + 1] = successors[rows[:, t], rng.integers(0, 4, B)]
        batches.append((rows[:, :-1].copy(), rows[:, 1:].copy()))
    return batches


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_same_sizes_and_flops(depth):
    tconf = train.build_model_config(depth, 8192)
    mconf = train_mlx.build_model_config(depth, 8192)
    with torch.device("meta"):
        tm = train.GPT(tconf)
    mm = train_mlx.GPT(mconf)
    assert tm.num_scaling_params() == mm.num_scaling_params()
    assert tm.estimate_flops() == mm.estimate_flops()
    # the memory model counts the same parameters, from the trainer's own architecture
    gate = tm.transformer.h[-1].attn.ve_gate_channels  # the last layer always has a value embedding
    assert memory.count_parameters(depth, train.ASPECT_RATIO, train.HEAD_DIM, 8192, gate) == \
        tm.num_scaling_params()["total"]
    torch_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    assert torch_shapes == {k: tuple(v.shape) for k, v in tree_flatten(mm.parameters())}


@pytest.mark.parametrize("depth", [2, 6])
def test_the_memory_model_follows_an_edited_architecture(depth, monkeypatch):
    """An agent that edits ASPECT_RATIO or HEAD_DIM in its trainer gets estimates of the model it built."""
    for module in (train, train_mlx):
        monkeypatch.setattr(module, "ASPECT_RATIO", 96)
        monkeypatch.setattr(module, "HEAD_DIM", 64)
    with torch.device("meta"):
        tm = train.GPT(train.build_model_config(depth, 8192))
    mm = train_mlx.GPT(train_mlx.build_model_config(depth, 8192))
    gate = tm.transformer.h[-1].attn.ve_gate_channels
    for model in (tm, mm):
        assert memory.count_parameters(depth, 96, 64, 8192, gate) == model.num_scaling_params()["total"]


INIT_CONFIG = dict(TINY, vocab_size=2048, n_embd=256)


def test_same_init_statistics():
    config = INIT_CONFIG
    torch.manual_seed(0)
    tm = train.GPT(train.GPTConfig(**config))
    tm.init_weights(dtype=torch.float32)
    mx.random.seed(0)
    mm = train_mlx.GPT(train_mlx.GPTConfig(**config))
    mm.init_weights(dtype=mx.float32)
    mlx_params = dict(tree_flatten(mm.parameters()))
    s = 3**0.5 * 256**-0.5
    for name, t in tm.state_dict().items():
        a, b = t.float().numpy(), np.array(mlx_params[name])
        if not a.any():  # zero-initialised: output projections and value-embedding gates
            assert not b.any(), name
            continue
        if name.endswith("lambdas"):  # constants: 1.0 and 0.1
            np.testing.assert_array_equal(a, b, err_msg=name)
            continue
        # Same distribution: matching mean, std and range (uniform(-s, s) or the normals)
        assert abs(a.mean() - b.mean()) < 0.05 * a.std(), name
        assert abs(a.std() / b.std() - 1) < 0.03, name
        if "c_" in name or "value_embeds" in name:
            assert a.min() >= -s and b.min() >= -s and a.max() <= s and b.max() <= s, name
            assert abs(a.std() - s / 3**0.5) < 0.03 * s, name


def original_init(name, n_embd):
    """The original's init of a parameter: ("normal", std), ("uniform", bound) or ("constant", value)."""
    s = 3**0.5 * n_embd**-0.5  # uniform with the std of N(0, 1/d)
    rules = [
        (r"transformer\.wte\.weight", ("normal", 1.0)),
        (r"lm_head\.weight", ("normal", 0.001)),
        (r"transformer\.h\.\d+\.(attn\.c_[qkv]|mlp\.c_fc)\.weight", ("uniform", s)),
        (r"value_embeds\.\d+\.weight", ("uniform", s)),
        (r"transformer\.h\.\d+\.(attn\.c_proj|mlp\.c_proj|attn\.ve_gate)\.weight", ("constant", 0.0)),
        (r"resid_lambdas", ("constant", 1.0)),
        (r"x0_lambdas", ("constant", 0.1)),
    ]
    matches = [law for pattern, law in rules if re.fullmatch(pattern, name)]
    assert len(matches) == 1, f"{name}: no init rule (or several) in this test"
    return matches[0]


def cdf_distance(sample, law):
    """The largest gap between the sample's CDF and the law's, read at the law's 0.1 %, 0.2 %, ... 99.9 % quantiles,
    and the gap a sample of this size from the law itself exceeds with probability below 1e-6: by the
    Dvoretzky-Kiefer-Wolfowitz inequality P(sup |F_n - F| > eps) <= 2 exp(-2 n eps^2), for any n."""
    kind, scale = law
    probabilities = np.arange(1, 1000) / 1000
    if kind == "normal":
        quantiles = np.array([NormalDist(0.0, scale).inv_cdf(p) for p in probabilities])
    else:
        quantiles = scale * (2 * probabilities - 1)
    sample = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    empirical = np.searchsorted(sample, quantiles, side="right") / sample.size
    return np.abs(empirical - probabilities).max(), math.sqrt(math.log(2 / 1e-6) / (2 * sample.size))


def torch_init_params(seed=0):
    torch.manual_seed(seed)
    model = train.GPT(train.GPTConfig(**INIT_CONFIG))
    model.init_weights(dtype=torch.float32)
    return {name: t.numpy() for name, t in model.state_dict().items()}


def mlx_init_params(seed=0):
    mx.random.seed(seed)
    model = train_mlx.GPT(train_mlx.GPTConfig(**INIT_CONFIG))
    model.init_weights(dtype=mx.float32)
    return {name: np.array(p) for name, p in tree_flatten(model.parameters())}


@pytest.mark.parametrize("init_params", [torch_init_params, mlx_init_params], ids=["train.py", "train_mlx.py"])
def test_init_draws_each_parameter_from_the_originals_distribution(init_params):
    for name, values in init_params().items():
        kind, value = original_init(name, INIT_CONFIG["n_embd"])
        if kind == "constant":
            assert np.all(values == np.float32(value)), name
            continue
        distance, limit = cdf_distance(values, (kind, value))
        assert distance < limit, f"{name}: CDF {distance:.4f} from {kind} {value:g} (limit {limit:.4f})"


def test_init_distance_tells_near_misses_apart():
    # The test above can fail: same mean and std, or the same family at twice the scale, is far past the limit
    rng = np.random.default_rng(0)
    n = INIT_CONFIG["vocab_size"] * INIT_CONFIG["n_embd"]
    distance, limit = cdf_distance(rng.uniform(-3**0.5, 3**0.5, n), ("normal", 1.0))  # the embedding as U(+-sqrt 3)
    assert distance > 10 * limit
    distance, limit = cdf_distance(rng.normal(0, 0.002, n), ("normal", 0.001))  # lm_head at twice its std
    assert distance > 10 * limit
    distance, limit = cdf_distance(rng.normal(0, 1.0, n), ("normal", 1.0))
    assert distance < limit


def test_norm_agrees_in_bf16_with_float32_eps():
    x, expected = norm_probe()  # F.rms_norm's result for bf16 rows: float32 math, float32's eps
    ours = train.norm(x)
    theirs = train_mlx.norm(mx.array(x.float().numpy()).astype(mx.bfloat16))
    assert ours.dtype == torch.bfloat16 and theirs.dtype == mx.bfloat16
    torch.testing.assert_close(ours.double(), expected, rtol=1e-2, atol=0)
    torch.testing.assert_close(torch.from_numpy(np.array(theirs.astype(mx.float32))).double(), expected, rtol=1e-2, atol=0)


def test_rope_rotations_agree():
    x = np.random.default_rng(0).standard_normal((2, 50, 3, 32)).astype(np.float32)  # (B, T, H, D)
    tm = train.GPT(train.GPTConfig(**TINY))
    cos, sin = tm._precompute_rotary_embeddings(50, 32)  # the float32 tables train.py uses on CPU
    ours = train.apply_rotary_emb(torch.from_numpy(x), cos, sin).numpy()
    theirs = np.array(train_mlx.rope(mx.array(x).transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    assert rel_err(theirs, ours) < 1e-5


def test_weight_conversion_round_trips():
    tm, mm = make_pair(TINY)
    tm2 = train.GPT(train.GPTConfig(**TINY))
    tm2.init_weights(dtype=torch.float32)
    mlx_to_torch(mm, tm2)
    for name, value in tm.state_dict().items():
        assert torch.equal(value, tm2.state_dict()[name]), name


def test_identical_weights_give_identical_logits_and_losses():
    tm, mm = make_pair(TINY)
    perturb(tm, mm)  # non-trivial weights everywhere: zero-init projections and gates would hide half the network
    x, y = markov_batches(1, 3, 64, 512)[0]
    with torch.no_grad():
        t_logits = tm(torch.from_numpy(x)).numpy()
        t_loss = tm(torch.from_numpy(x), torch.from_numpy(y), reduction="none").numpy()
    m_logits = np.array(mm(mx.array(x, dtype=mx.int32)))
    m_loss = np.array(mm(mx.array(x, dtype=mx.int32), mx.array(y, dtype=mx.int32), reduction="none"))
    assert rel_err(m_logits, t_logits) <= 1e-4
    assert rel_err(m_loss, t_loss) <= 1e-4


def perturb(tm, mm):
    """Small noise on every weight, copied to both models. From the exact init the scalar lambdas sit where the
    loss does not depend on them (x and x0 are parallel and RMSNorm ignores scale), so their gradients are rounding
    noise and Adam's sign-like first step would amplify that noise differently in each framework."""
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch_to_mlx(tm, mm)


@pytest.mark.slow
def test_twenty_optimizer_steps_follow_the_same_loss_curve():
    """The model and the optimizer together, step after step, the schedules over a whole (short) run: warmdown to
    zero included. 20 steps, not 50: each costs MLX's CPU build about a second eagerly (compiled, the first took
    minutes), the loss has fallen by 1.8 by then, and the constants, schedules and groups are compared directly
    below."""
    config = dict(TINY, vocab_size=256, n_embd=64)  # MLX's CPU build is slow: keep the steps small
    tm, mm = make_pair(config)
    perturb(tm, mm)
    n_steps = 20
    kwargs = dict(unembedding_lr=train.UNEMBEDDING_LR, embedding_lr=train.EMBEDDING_LR, scalar_lr=train.SCALAR_LR,
                  adam_betas=train.ADAM_BETAS, matrix_lr=train.MATRIX_LR, weight_decay=train.WEIGHT_DECAY)
    t_opt = tm.setup_optimizer(**kwargs)
    m_opt = mm.setup_optimizer(**kwargs)
    loss_and_grad = train_mlx.nn.value_and_grad(mm, lambda model, x, y: model(x, y))
    t_losses, m_losses = [], []
    for step, (x, y) in enumerate(markov_batches(n_steps, 2, 64, 256, seed=1)):
        progress = step / n_steps  # the real schedules, driven by a simulated clock
        schedule = (train.get_lr_multiplier(progress), train.get_muon_momentum(step), train.get_weight_decay(progress))
        loss = tm(torch.from_numpy(x), torch.from_numpy(y))
        loss.backward()
        t_opt.set_schedule(*schedule)
        t_opt.step()
        tm.zero_grad(set_to_none=True)
        t_losses.append(loss.item())

        loss, grads = loss_and_grad(mm, mx.array(x, dtype=mx.int32), mx.array(y, dtype=mx.int32))
        m_opt.set_schedule(*schedule)
        m_opt.update(mm, grads)
        mx.eval(mm.parameters(), m_opt.state)
        m_losses.append(loss.item())
    t_losses, m_losses = np.array(t_losses), np.array(m_losses)
    assert t_losses[-1] < t_losses[0] - 1.0, "the run must actually learn for the comparison to mean anything"
    assert np.all(np.abs(m_losses - t_losses) / t_losses <= 0.01), np.abs(m_losses - t_losses) / t_losses


# ---------------------------------------------------------------------------
# Everything in the agent's hands, the two files side by side: constants, schedules, the loop, the optimizer's
# groups, the softcap. The tests above compare what the models compute; a constant a few per cent off, or a schedule
# that differs only late in a run, would pass them. These are the shipped defaults' tests: an agent edits one trainer
# and runs it; only this suite says that the twins now differ.
# ---------------------------------------------------------------------------

TWINS = {"train.py": train, "train_mlx.py": train_mlx}
FRAMEWORK_ONLY = {  # module-level constants that only one trainer has, or that differ by design
    "train.py": {"BACKEND"},  # detected; train_mlx.py's is "mlx"
    "train_mlx.py": {"BACKEND", "COMPILE"},
}


def syntax(module):
    with open(module.__file__) as f:
        return ast.parse(f.read())


def constants(module):
    """The module-level UPPER_CASE assignments: name -> the expression assigned, as source."""
    return {node.targets[0].id: ast.unparse(node.value) for node in syntax(module).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper()}


def test_every_hyperparameter_constant_is_the_same_in_both_trainers():
    ours, theirs = ({name: expr for name, expr in constants(m).items() if name not in FRAMEWORK_ONLY[file]}
                    for file, m in TWINS.items())
    assert ours == theirs
    assert {"EMBEDDING_LR", "MATRIX_LR", "ADAM_BETAS", "WARMDOWN_RATIO", "DEPTH", "TOTAL_BATCH_SIZE"} <= set(ours)
    for name in ours:  # and the values they evaluate to (the tier's rows on this machine may differ by backend)
        if "SUGGESTED" not in ours[name] and name not in ("HW", "SUGGESTED"):
            assert getattr(train, name) == getattr(train_mlx, name), name


def function_source(module, name):
    """A top-level function's or class's code as ast.unparse writes it: no comments, one layout."""
    (node,) = [n for n in syntax(module).body if getattr(n, "name", None) == name]
    node.decorator_list = []
    return ast.unparse(node)


@pytest.mark.parametrize("name", ["build_model_config", "get_lr_multiplier", "get_muon_momentum", "get_weight_decay",
                                  "has_ve", "GPTConfig"])
def test_the_framework_free_functions_are_the_same_code(name):
    assert function_source(train, name) == function_source(train_mlx, name)


SCHEDULE_SETTINGS = [  # (WARMUP_RATIO, WARMDOWN_RATIO, FINAL_LR_FRAC, WEIGHT_DECAY): the shipped ones, and others
    (train.WARMUP_RATIO, train.WARMDOWN_RATIO, train.FINAL_LR_FRAC, train.WEIGHT_DECAY),
    (0.1, 0.3, 0.05, 0.1),
    (0.0, 1.0, 0.0, 0.0),
]


@pytest.mark.parametrize("settings", SCHEDULE_SETTINGS)
def test_every_schedule_agrees_over_its_whole_range(settings, monkeypatch):
    for module in TWINS.values():
        for name, value in zip(("WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC", "WEIGHT_DECAY"), settings):
            monkeypatch.setattr(module, name, value)
    for progress in np.linspace(0, 1, 20001):
        assert train.get_lr_multiplier(progress) == train_mlx.get_lr_multiplier(progress), progress
        assert train.get_weight_decay(progress) == train_mlx.get_weight_decay(progress), progress
    for step in range(2000):  # the momentum ramp ends at step 300
        assert train.get_muon_momentum(step) == train_mlx.get_muon_momentum(step), step


def training_loop(module):
    (loop,) = [n for n in ast.walk(main_block(module.__file__)) if isinstance(n, ast.While)]
    return loop


LOOP_FRAMEWORK_ONLY = {  # statements of the training loop that are each framework's own (their unparsed start)
    "train.py": ("for micro_step in", "optimizer.step()", "model.zero_grad(", "train_loss_f = train_loss.item()"),
    "train_mlx.py": ("grads = None", "for micro_step in", "optimizer_step(grads)", "mx.eval(model.state, optimizer",
                     "train_loss_f = loss.item()"),
}
AFTER_LOOP = ("total_tokens = ", "steady_state_mfu = ", "peak_vram_mb = ", "run.summary(")


def test_the_training_loop_is_the_same_statements_in_both_trainers():
    """Progress, the schedules and the arguments passed to them, the timing, the fast fail, the logging, the stop
    rule and the summary: the same code, statement for statement, apart from each framework's own step."""
    loops = {}
    for file, module in TWINS.items():
        statements = [ast.unparse(s) for s in training_loop(module).body]
        loops[file] = [s for s in statements if not s.startswith(LOOP_FRAMEWORK_ONLY[file])]
        assert len(statements) - len(loops[file]) == len(LOOP_FRAMEWORK_ONLY[file]), file
    assert loops["train.py"] == loops["train_mlx.py"]
    assert any("optimizer.set_schedule(" in s for s in loops["train.py"])
    after = {file: [ast.unparse(s) for s in main_block(module.__file__).body if ast.unparse(s).startswith(AFTER_LOOP)]
             for file, module in TWINS.items()}
    assert after["train.py"] == after["train_mlx.py"] and len(after["train.py"]) == len(AFTER_LOOP)


def main_call(module, method):
    """The keyword arguments of the main part's call of `method`, evaluated among the module's constants."""
    (call,) = [n for n in ast.walk(main_block(module.__file__)) if isinstance(n, ast.Call)
               and isinstance(n.func, ast.Attribute) and n.func.attr == method]
    assert not call.args, "keywords only: a swapped positional argument would read the same"
    return {kw.arg: eval(compile(ast.Expression(kw.value), module.__file__, "eval"), vars(module))
            for kw in call.keywords}


def run_schedule_statements(module, optimizer, step, total_training_time):
    """Run the loop's own statements from `progress = ...` through `optimizer.set_schedule(...)` at this step."""
    body = training_loop(module).body
    names = [ast.unparse(s) for s in body]
    start = next(i for i, s in enumerate(names) if s.startswith("progress = "))
    end = next(i for i, s in enumerate(names) if s.startswith("optimizer.set_schedule("))
    code = compile(ast.Module(body=body[start:end + 1], type_ignores=[]), module.__file__, "exec")
    exec(code, vars(module), dict(optimizer=optimizer, step=step, total_training_time=total_training_time))


def optimizer_groups(optimizer, names):
    """The optimizer's groups with parameters as names: everything a step reads (the initial LR is set_schedule's)."""
    return [{k: ([names(p) for p in v] if k == "params" else v) for k, v in group.items()}
            for group in optimizer.param_groups]


@pytest.mark.parametrize("fixed_steps", [0, 1000])  # timed, and fixed work (AUTORESEARCH_STEPS=1000)
def test_the_optimizer_groups_hold_the_same_values_at_the_first_step_and_late(fixed_steps, monkeypatch):
    """Each trainer's own setup_optimizer call (its arguments read from the main part) and its own loop statements
    setting the schedule: the same groups, the same parameters in each, the same LR, betas, eps, weight decay,
    momentum and Newton-Schulz steps, at step 0 and at 90 % of the run (deep in the warmdown, past the momentum
    ramp)."""
    tm, mm = make_pair(TINY)
    torch_names = {id(p): name for name, p in tm.named_parameters()}
    models = {"train.py": (tm, lambda p: torch_names[id(p)]), "train_mlx.py": (mm, lambda p: p)}
    optimizers, groups = {}, {}
    for file, module in TWINS.items():
        monkeypatch.setattr(module, "FIXED_STEPS", fixed_steps)
        model, _ = models[file]
        optimizers[file] = model.setup_optimizer(**main_call(module, "setup_optimizer"))
    assert main_call(train, "setup_optimizer") == main_call(train_mlx, "setup_optimizer")
    for step, seconds in ((0, 0.0), (900, 0.9 * train.TIME_BUDGET)):
        for file, module in TWINS.items():
            run_schedule_statements(module, optimizers[file], step, seconds)
            groups[file] = optimizer_groups(optimizers[file], models[file][1])
        assert groups["train.py"] == groups["train_mlx.py"], step
        if step:  # late: the schedules have moved every value they drive
            assert all(g["lr"] == pytest.approx(0.2 * g["initial_lr"]) for g in groups["train.py"])
            muon = [g for g in groups["train.py"] if g["kind"] == "muon"]
            assert all(g["momentum"] == 0.95 and g["weight_decay"] == pytest.approx(0.2 * 0.1) for g in muon)
    assert len(groups["train.py"]) == 5 + len({tuple(p.shape) for p in tm.transformer.h.parameters()})


def test_the_softcap_is_the_originals_at_logits_where_it_bites():
    """The head (final norm, lm_head, softcap, loss) with raw logits up to +-45: 15 tanh(45 / 15) is 14.93, where a
    softcap 3 % off moves the logits, the losses and the gradients by about as much. The two frameworks agree there,
    forward and backward (MLX's own VJP for the loss), and the cap is the original's 15."""
    tm, mm = make_pair(TINY)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 64, TINY["n_embd"])).astype(np.float32)
    targets = rng.integers(0, TINY["vocab_size"], (2, 64))
    with torch.no_grad():
        tm.lm_head.weight.copy_(torch.randn_like(tm.lm_head.weight))
        raw = train.norm(torch.from_numpy(hidden)) @ tm.lm_head.weight.T
        tm.lm_head.weight.mul_(45 / raw.abs().max())
    torch_to_mlx(tm, mm)
    x = torch.from_numpy(hidden).requires_grad_()
    logits = tm.head(x, None, "mean")
    assert 14.9 < logits.abs().max().item() < 14.95  # the softcap decides these values
    loss = tm.head(x, torch.from_numpy(targets), "mean")
    loss.backward()

    def m_loss(weight, x):
        mm.lm_head.weight = weight
        return mm.head(x, mx.array(targets, dtype=mx.int32), "mean")

    m_x = mx.array(hidden)
    m_value, (m_grad_w, m_grad_x) = mx.value_and_grad(m_loss, argnums=(0, 1))(mm.lm_head.weight, m_x)
    assert rel_err(np.array(mm.head(m_x, None, "mean")), logits.detach().numpy()) <= 1e-5
    assert abs(m_value.item() - loss.item()) <= 1e-5 * loss.item()
    for got, expected in ((m_grad_w, tm.lm_head.weight.grad), (m_grad_x, x.grad)):
        assert rel_err(np.array(got), expected.numpy()) <= 1e-4
    for file, module in TWINS.items():
        (value,) = [n.value.value for n in ast.walk(syntax(module)) if isinstance(n, ast.Assign)
                    and ast.unparse(n.targets[0]) == "softcap"]
        assert value == 15, file


# ---------------------------------------------------------------------------
# The metric: evaluate_bpb on the real (session) cache, at the real sequence length
# ---------------------------------------------------------------------------

EVAL_CONFIG = dict(sequence_len=2048, vocab_size=8192, n_layer=2, n_head=1, n_kv_head=1, n_embd=128, window_pattern="SSSL")


@pytest.fixture
def eval_setup(prepared_cache, monkeypatch):
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 6 * prepare.MAX_SEQ_LEN)  # 6 validation rows keep MLX-on-CPU quick
    tokenizer = prepare.Tokenizer.from_directory()
    tm, mm = make_pair(EVAL_CONFIG)
    perturb(tm, mm)
    return tokenizer, tm, mm


@pytest.mark.slow
def test_evaluate_bpb_is_the_same_number_for_both_frameworks(eval_setup):
    tokenizer, tm, mm = eval_setup
    t_bpb = train.evaluate(tm, tokenizer, 3)
    m_bpb = train_mlx.evaluate(mm, tokenizer, 3)
    assert math.isfinite(t_bpb) and t_bpb > 0
    assert abs(t_bpb - m_bpb) <= 1e-4


@pytest.mark.slow
def test_evaluate_bpb_ignores_batch_size_and_is_deterministic(eval_setup):
    tokenizer, tm, _ = eval_setup
    values = [train.evaluate(tm, tokenizer, bs) for bs in (1, 3, 8)]
    assert max(values) - min(values) <= 1e-6 * values[0], values
    assert train.evaluate(tm, tokenizer, 3) == train.evaluate(tm, tokenizer, 3)


@pytest.mark.parametrize("batch_size", [3, 4])  # 6 rows: whole batches, and a last batch of 2 counted rows
def test_evaluate_bpb_of_a_fixed_model_is_the_metric_written_out_to_the_last_bit(eval_setup, batch_size):
    # A pinned model (seed 0, perturbed) through train.py's evaluation: the value the metric defines, bit for bit
    tokenizer, tm, _ = eval_setup

    def losses(x, y):
        with torch.no_grad():
            return tm(torch.from_numpy(x), torch.from_numpy(y), reduction="none").numpy()

    assert train.evaluate(tm, tokenizer, batch_size) == reference_bpb(tokenizer, losses, batch_size)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # the CPU window mask
def test_evaluate_bpb_runs_through_the_training_graphs_of_train_pys_compiled_model(eval_setup):
    # train.py on CUDA compiles each block and the head for training, then evaluates with whole batches and autograd
    # on: only the head compiles again (per-token losses), even with a last batch of fewer rows, and the number is
    # the eager one.
    from torch._dynamo.utils import counters
    tokenizer, tm, _ = eval_setup
    eager = train.evaluate(tm, tokenizer, 4)
    torch._dynamo.reset()
    counters.clear()
    for block in tm.transformer.h:
        block.compile(backend="aot_eager", dynamic=False)
    tm.head = torch.compile(tm.head, backend="aot_eager", dynamic=False)
    x, y, _ = next(prepare.make_dataloader(tokenizer, 4, prepare.MAX_SEQ_LEN, "train"))
    tm(torch.from_numpy(x), torch.from_numpy(y)).backward()
    assert counters["stats"]["unique_graphs"] == 3  # (S, no value embedding), (L, value embedding), the head
    tm.eval()
    compiled = train.evaluate(tm, tokenizer, 4, compiled=True)  # 6 rows: batches of 4, the last with 2 counted
    assert counters["stats"]["unique_graphs"] == 4
    assert compiled == pytest.approx(eager, rel=1e-6)
    torch._dynamo.reset()
