"""Accelerator paths. CI has no GPU, so these skip there, by name; the same code runs on the CPU in
test_models.py, test_parity.py and test_e2e.py. On a Mac (or an NVIDIA box) `uv run pytest` runs them."""
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import MLX_ON_CPU, after_line, edited_copy, model_size, need, run_script

need("mlx")  # before the imports below: a framework that is not installed skips this module, naming its extra
need("torch")

import mlx.core as mx
import mlx.nn as nn
import torch
from mlx.utils import tree_flatten
from torch.nn.attention.flex_attention import flex_attention

import prepare
import train
import train_mlx
from backends import muon_mlx
from tests.compute_dtype import check_bf16_forward, check_compiled, check_norm
from tests.convert import torch_to_mlx

TINY = dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")


def torch_pair(device):
    torch.manual_seed(0)
    cpu = train.GPT(train.GPTConfig(**TINY))
    cpu.init_weights(dtype=torch.float32)
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.02 * torch.randn_like(p))
    other = train.GPT(train.GPTConfig(**TINY)).to(device)
    other.init_weights(dtype=torch.float32)
    other.load_state_dict(cpu.state_dict())
    return cpu, other


def batch(device="cpu"):
    rng = np.random.default_rng(0)
    return (torch.from_numpy(rng.integers(0, 512, (2, 64))).to(device),
            torch.from_numpy(rng.integers(0, 512, (2, 64))).to(device))


def check_torch_device(device):
    cpu, other = torch_pair(device)
    x, y = batch()
    expected = cpu(x, y, reduction="none")
    got = other(x.to(device), y.to(device), reduction="none")
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)
    optimizer = other.setup_optimizer()
    got.mean().backward()
    optimizer.set_schedule(1.0, 0.85, 0.2)
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in other.parameters())


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs an Apple GPU (PyTorch MPS)")
def test_mps_forward_matches_cpu_and_the_optimizer_steps():
    check_torch_device("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (PyTorch CUDA)")
def test_cuda_forward_matches_cpu_and_the_optimizer_steps():
    check_torch_device("cuda")


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs an Apple GPU (PyTorch MPS)")
def test_mps_bf16_autocast_keeps_bf16_through_norm():
    check_norm("mps")
    check_bf16_forward("mps")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (PyTorch CUDA)")
def test_cuda_bf16_autocast_keeps_bf16_through_norm_compiled_too():
    # rms_norm runs in float32 under CUDA autocast (PyTorch's rule from 2.12 on, installed by the test before)
    check_norm("cuda")
    model, idx = check_bf16_forward("cuda")
    check_compiled(model, idx, "cuda")  # compiled, the windowed layers go through flex_attention


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (flex_attention's CUDA path)")
def test_cuda_flex_attention_matches_the_sdpa_window_mask():
    # The kernel that train.py's compiled windowed blocks run: flex_attention compiled, with the window's block mask.
    # (Called uncompiled, train.attention takes SDPA's path, and flex_attention would run a reference implementation.)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2048, 128, device="cuda", requires_grad=True) for _ in range(3))
    block_mask = train.window_block_mask(2048, 1024, str(q.device))  # the key train.attention looks the mask up by
    flex = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=block_mask)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=train.window_mask(2048, 1024, q.device))
    torch.testing.assert_close(flex, sdpa, rtol=2e-3, atol=2e-3)
    for a, b in zip(torch.autograd.grad(flex.sum(), (q, k, v)), torch.autograd.grad(sdpa.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


needs_mlx_gpu = pytest.mark.skipif(not mx.metal.is_available() and not (hasattr(mx, "cuda") and mx.cuda.is_available()),
                                   reason="needs MLX with a GPU (Metal on a Mac, or MLX's CUDA build)")


def on_cpu_and_gpu(fn, dtype):
    """fn(model, x, y) with train_mlx's GPT built on MLX's CPU and on its GPU, both holding the same weights."""
    cpu, _ = torch_pair("cpu")
    x, y = (mx.array(t.numpy(), dtype=mx.int32) for t in batch())
    results = {}
    for device in (mx.cpu, mx.gpu):
        with mx.stream(device):
            model = train_mlx.GPT(train_mlx.GPTConfig(**TINY))
            model.init_weights(dtype=dtype)
            torch_to_mlx(cpu, model)
            results[device] = fn(model, x, y)
    return results


@needs_mlx_gpu
def test_mlx_gpu_matches_mlx_cpu_in_bf16_and_float32():
    losses = lambda model, x, y: np.array(model(x, y, reduction="none"))
    results = {dtype: on_cpu_and_gpu(losses, dtype) for dtype in (mx.float32, mx.bfloat16)}
    np.testing.assert_allclose(results[mx.float32][mx.gpu], results[mx.float32][mx.cpu], rtol=1e-3, atol=1e-3)
    # bf16 compute: the loss stays close to float32's (the residual stream must not silently run in float32)
    assert np.abs(results[mx.bfloat16][mx.gpu] - results[mx.float32][mx.cpu]).mean() < 0.05


@needs_mlx_gpu
def test_mlx_gpu_gradients_match_mlx_cpu():
    # The GPU's own attention and embedding backward (additive window mask, float32 embedding gradient sum)
    def gradients(model, x, y):
        _, g = nn.value_and_grad(model, lambda x, y: model(x, y))(x, y)
        return {path: np.array(a) for path, a in tree_flatten(g)}

    grads = on_cpu_and_gpu(gradients, mx.float32)
    assert grads[mx.gpu].keys() == grads[mx.cpu].keys()
    for path, expected in grads[mx.cpu].items():  # relative to the gradient's norm: CUDA's float32 matmuls use TF32
        error = np.linalg.norm(grads[mx.gpu][path] - expected)
        assert error <= 1e-2 * np.linalg.norm(expected) + 1e-7, (path, error, np.linalg.norm(expected))


@needs_mlx_gpu
@pytest.mark.parametrize("chunk", [1024, 80])  # the trainer's (one chunk here), and three chunks, the last padded
@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])  # contiguous, or (B, H, T, D) views of (B, T, H, D) memory
def test_mlx_gpu_windowed_attention_in_bf16_matches_the_masked_softmax(chunk, layout):
    # bf16 at head dim 128 takes the GPU's fused kernels (cuDNN on CUDA): a causal call and a masked chunked one,
    # with q, k, v as the model passes them too. Reference: the plain masked softmax in float32 on the CPU, forward
    # and backward.
    T, window = 256, 64
    rng = np.random.default_rng(0)
    q, k, v, w = (rng.normal(size=(2, 2, T, 128)).astype(np.float32) for _ in range(4))
    if layout == "BTHD":  # stored (B, T, H, D), seen as (B, H, T, D) after the cast
        q, k, v = (a.transpose(0, 2, 1, 3).copy() for a in (q, k, v))
    view = (lambda a: a) if layout == "BHTD" else (lambda a: a.transpose(0, 2, 1, 3))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = mx.array(np.where((i - j >= 0) & (i - j <= window), 0.0, -np.inf), mx.float32)
    sdpa = lambda *a, **kw: mx.fast.scaled_dot_product_attention(*a, scale=128**-0.5, **kw)

    def loss(fn, dtype, q, k, v):
        return (fn(*(view(a.astype(dtype)) for a in (q, k, v))).astype(mx.float32) * mx.array(w)).sum()

    results = {}
    for device, dtype, fn in ((mx.gpu, mx.bfloat16, lambda q, k, v: train_mlx.windowed_attention(
                                   q, k, v, window, sdpa, chunk=chunk)),
                              (mx.cpu, mx.float32, lambda q, k, v: sdpa(q, k, v, mask=mask))):
        with mx.stream(device):
            arrays = [mx.array(a) for a in (q, k, v)]
            out = fn(*(view(a.astype(dtype)) for a in arrays)).astype(mx.float32)
            grads = mx.grad(lambda *a: loss(fn, dtype, *a), argnums=(0, 1, 2))(*arrays)
            results[device] = [np.array(a) for a in (out, *grads)]
    for got, expected in zip(results[mx.gpu], results[mx.cpu]):
        assert np.linalg.norm(got - expected) <= 2e-2 * np.linalg.norm(expected), (
            np.linalg.norm(got - expected), np.linalg.norm(expected))


@needs_mlx_gpu
def test_mlx_gpu_muon_step_matches_mlx_cpu():
    # The GPU's Muon update must be the CPU's, for a tall and a wide group: float32 on both (MLX's CUDA build runs
    # float32 matrix products as TF32, which moves these Newton-Schulz outputs by ~0.4%, emulated on the CPU; a bf16
    # iteration would move them ~5%).
    rng = np.random.default_rng(0)
    shapes = {"tall": (256, 64), "wide": (64, 256)}
    params = {f"{kind}{i}": 0.05 * rng.normal(size=shape).astype(np.float32) for kind, shape in shapes.items()
              for i in range(2)}
    grads = {name: rng.normal(size=p.shape).astype(np.float32) for name, p in params.items()}
    groups = [dict(kind="muon", params=[f"{kind}{i}" for i in range(2)], lr=0.02, momentum=0.95, ns_steps=5,
                   beta2=0.95, weight_decay=0.2) for kind in shapes]
    updates = {}
    for device in (mx.cpu, mx.gpu):
        with mx.stream(device):
            model = nn.Module()
            for name, p in params.items():
                model[name] = mx.array(p)
            muon_mlx.MuonAdamW(groups).update(model, {name: mx.array(g) for name, g in grads.items()})
            updates[device] = {name: np.array(p) - params[name] for name, p in tree_flatten(model.parameters())}
    for name, expected in updates[mx.cpu].items():
        error = np.linalg.norm(updates[mx.gpu][name] - expected)
        assert error <= 1e-2 * np.linalg.norm(expected), (name, error, np.linalg.norm(expected))


# ---------------------------------------------------------------------------
# The two trainers as they really train, side by side: one experiment
# ---------------------------------------------------------------------------

LOAD_WEIGHTS = {  # after the trainer's own init: the weights of an .npz (float32), each cast to its parameter's dtype
    "train.py": "model.load_state_dict({n: torch.from_numpy(weights[n]) for n in weights.files})",
    "train_mlx.py": "from mlx.utils import tree_map_with_path; model.update(tree_map_with_path("
                    "lambda n, p: mx.array(weights[n]).astype(p.dtype), model.parameters()))",
}
PROGRESS = re.compile(r"\rstep (\d{5}) \([\d.]+%\) \| loss: ([\d.]+)")


def fixed_work_curve(folder, script, weights, env, *edits):
    """An edited copy of `script`, started from `weights`, run in fixed-work mode: the smoothed training loss of every
    step (the progress line's) and the summary's val_bpb."""
    folder.mkdir()
    load = f"import numpy as np; weights = np.load({str(weights)!r}); {LOAD_WEIGHTS[script]}"
    path = edited_copy(folder, script, *edits, after_line(script, "model.init_weights(", load))
    returncode, _, log = run_script(path, str(folder), env=env)
    assert returncode == 0, log[-3000:]
    steps = [(int(step), float(loss)) for step, loss in PROGRESS.findall(log)]
    assert [step for step, _ in steps] == list(range(int(env["AUTORESEARCH_STEPS"]))), log[-3000:]
    return np.array([loss for _, loss in steps]), float(re.search(r"^val_bpb: +(\S+)$", log, re.MULTILINE).group(1))


def trainers_side_by_side(tmp_path, depth, rows, steps, eval_rows, env, mlx_edits=(), repeats=1):
    """train.py and train_mlx.py, each run as a script with `env`, `repeats` times, at one model size, from
    identical weights (the init with small noise on every weight, as test_parity.perturb explains, in float32, stored
    in each trainer's dtypes) on the same batches in the same order (the data loader is deterministic): for each
    script, its loss curves (one row a run) and val_bpb (one a run), every run at once."""
    vocab_size = prepare.Tokenizer.from_directory().get_vocab_size()
    torch.manual_seed(0)
    model = train.GPT(train.build_model_config(depth, vocab_size))
    model.init_weights(dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = tmp_path / "weights.npz"
    np.savez(weights, **{name: p.detach().numpy() for name, p in model.named_parameters()})
    env = {**env, "AUTORESEARCH_STEPS": str(steps), "AUTORESEARCH_EVAL_TOKENS": str(eval_rows * prepare.MAX_SEQ_LEN)}
    edits = {"train.py": model_size("train.py", depth, rows, 1),
             "train_mlx.py": [*model_size("train_mlx.py", depth, rows, 1), *mlx_edits]}
    runs = [(script, i) for script in edits for i in range(repeats)]
    with ThreadPoolExecutor(len(runs)) as pool:  # most of each run is start-up and compilation
        results = list(pool.map(lambda run: fixed_work_curve(
            tmp_path / f"{run[0].removesuffix('.py')}-{run[1]}", run[0], weights, env, *edits[run[0]]), runs))
    return {script: (np.array([curve for (s, _), (curve, _) in zip(runs, results) if s == script]),
                     np.array([bpb for (s, _), (_, bpb) in zip(runs, results) if s == script])) for script in edits}


def compare_curves(runs, curve_bound, bpb_bound):
    """The largest relative gap between the two trainers' loss curves (the mean of their runs), at every step, and
    between their mean val_bpb; printed with each trainer's own spread over its runs (run pytest with -s to see
    them) and held to the bounds."""
    (t_curves, t_bpbs), (m_curves, m_bpbs) = runs["train.py"], runs["train_mlx.py"]
    t_curve, m_curve, t_bpb, m_bpb = t_curves.mean(0), m_curves.mean(0), t_bpbs.mean(), m_bpbs.mean()
    gaps = np.abs(m_curve - t_curve) / t_curve
    for step in sorted({*range(0, len(gaps), max(1, len(gaps) // 20)), len(gaps) - 1}):
        print(f"step {step:4d}  train.py {t_curve[step]:.4f}  train_mlx.py {m_curve[step]:.4f}  gap {gaps[step]:.2%}")
    for script, bpbs in (("train.py", t_bpbs), ("train_mlx.py", m_bpbs)):
        print(f"{script} val_bpb of each run: {' '.join(f'{b:.6f}' for b in bpbs)}")
    bpb_gap = abs(m_bpb - t_bpb) / t_bpb
    print(f"largest curve gap {gaps.max():.2%} at step {gaps.argmax()}; val_bpb train.py {t_bpb:.6f}, "
          f"train_mlx.py {m_bpb:.6f}: gap {bpb_gap:.2%}")
    assert t_curve[-1] < t_curve[0] - 1.0, "the runs must actually learn for the comparison to mean anything"
    assert gaps.max() <= curve_bound, (gaps.max(), gaps.argmax())
    assert bpb_gap <= bpb_bound, (t_bpb, m_bpb)


@pytest.mark.slow
def test_both_trainers_on_the_cpu_follow_one_curve_end_to_end(prepared_cache, tmp_path):
    """What the GPU test below does, on the CPU in float32, where CI runs it: the trainers' own scripts, with
    everything but the weights as shipped (loop, schedules, step), agree closely. MLX's step runs uncompiled: on its
    CPU build mx.compile builds C++ kernels for minutes (over 20 on a loaded 2-core machine); the compiled step is
    test_e2e's (traced once) and the mlx_run fixture's."""
    runs = trainers_side_by_side(tmp_path, depth=2, rows=1, steps=6, eval_rows=2, env={"AUTORESEARCH_BACKEND": "cpu"},
                                 mlx_edits=[MLX_ON_CPU, ("COMPILE = True", "COMPILE = False")])
    compare_curves(runs, curve_bound=1e-3, bpb_bound=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or not (hasattr(mx, "cuda") and mx.cuda.is_available()),
                    reason="needs an NVIDIA GPU with PyTorch's CUDA and MLX's CUDA build")
def test_both_trainers_in_bf16_on_one_gpu_follow_one_curve_for_200_steps(prepared_cache, tmp_path):
    """train.py on CUDA and train_mlx.py on MLX's CUDA build, each in bf16 as it trains (torch.compile'd blocks,
    mx.compile'd step), from identical weights on the same batches, 200 fixed-work steps at depth 4 with one
    16-row micro-batch a step, 6 runs of each: the mean smoothed loss within 2% at every step, the mean val_bpb
    within 1%. Means, because GPU training in bf16 does not repeat itself: two runs of the same script from the same
    weights ended up to 2.4% apart in val_bpb (an H200, docs/measurements.md), which no single pair could resolve."""
    runs = trainers_side_by_side(tmp_path, depth=4, rows=16, steps=200, eval_rows=16,
                                 env={"AUTORESEARCH_BACKEND": "cuda"}, repeats=6)
    compare_curves(runs, curve_bound=0.02, bpb_bound=0.01)
