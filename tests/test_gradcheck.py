"""backends/gradcheck.py: the operations of train_mlx.py whose gradient is written by hand (@hand_gradient) are
checked against MLX's autodiff of their forward as a run starts, and a forward edited without its VJP stops the run
with one line instead of training on wrong gradients."""
import os

import pytest

from conftest import ROOT, SMOKE_ENV, need, run_script

need("mlx")  # before the imports below: a framework that is not installed skips this module, naming its extra

import mlx.core as mx

import train_mlx
from backends import gradcheck
from backends.gradcheck import check_gradients, hand_gradient

TINY = dict(sequence_len=64, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")
HAND_WRITTEN = {"embedding_lookup", "lm_head_cross_entropy", "relu_squared"}


def tiny_gpt(dtype):
    model = train_mlx.GPT(train_mlx.GPTConfig(**TINY))
    model.init_weights(dtype=dtype)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_models_hand_written_gradients_pass(dtype):
    assert set(check_gradients(tiny_gpt(dtype), TINY["vocab_size"])) == HAND_WRITTEN


# Each operation's forward, edited as an agent might, with its VJP left as it is
lm_head_cross_entropy = train_mlx.lm_head_cross_entropy.forward
EDITED_FORWARDS = {
    "relu_squared": lambda x: mx.where(x > 0, x * x * x, 0),  # relu cubed
    "embedding_lookup": lambda weight, idx: 2 * weight[idx],  # a scaled lookup
    "lm_head_cross_entropy": lambda x, weight, targets, softcap, n_chunks:  # a softcap of 30 where the VJP has 15
        lm_head_cross_entropy(x, weight, targets, 2 * softcap, n_chunks),
}


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("name", sorted(EDITED_FORWARDS))
def test_a_forward_edited_without_its_vjp_stops_the_run_with_one_line(monkeypatch, name, dtype):
    edited = hand_gradient(EDITED_FORWARDS[name])
    edited.__name__ = name
    edited.vjp(getattr(train_mlx, f"{name}_vjp"))
    monkeypatch.setattr(train_mlx, name, edited)
    with pytest.raises(SystemExit) as stop:
        check_gradients(tiny_gpt(dtype), TINY["vocab_size"])
    message = str(stop.value.code)
    assert message.startswith(f"error: the hand-written gradient of {name} (its .vjp) differs from autodiff of its "
                              f"forward by ")
    assert "\n" not in message and "@hand_gradient" in message


def test_a_vjp_that_cannot_run_for_the_edited_forward_stops_the_run_too(monkeypatch):
    # a forward that now returns another shape: the old VJP's gradient no longer fits its inputs
    edited = hand_gradient(lambda x: mx.where(x > 0, x * x, 0)[..., ::2])
    edited.__name__ = "relu_squared"
    edited.vjp(train_mlx.relu_squared_vjp)
    monkeypatch.setattr(train_mlx, "relu_squared", edited)
    monkeypatch.setattr(train_mlx.MLP, "__call__", lambda self, x: self.c_proj(mx.repeat(train_mlx.relu_squared(
        self.c_fc(x)), 2, axis=-1)))
    with pytest.raises(SystemExit) as stop:
        check_gradients(tiny_gpt(mx.float32), TINY["vocab_size"])
    assert str(stop.value.code).startswith("error: the hand-written gradient of relu_squared (its .vjp) fails to run (")


def test_an_operation_without_a_vjp_is_autodiff_and_passes():
    plain = hand_gradient(lambda x: x * x)
    assert gradcheck.gradient_error(plain, (mx.ones((3,)),), mx.random.key(0)) == 0


def test_the_check_leaves_the_runs_random_state_as_it_was():
    model = tiny_gpt(mx.float32)
    mx.random.seed(42)
    expected = mx.random.normal((4,))
    mx.random.seed(42)
    check_gradients(model, TINY["vocab_size"])
    assert mx.array_equal(mx.random.normal((4,)), expected)


def test_a_run_of_train_mlx_with_an_edited_block_forward_stops_with_one_line(prepared_cache, tmp_path):
    # The proof: a scratch copy of train_mlx.py whose MLP activation is edited, its VJP untouched
    with open(os.path.join(ROOT, "train_mlx.py")) as f:
        source = f.read()
    forward = "    return mx.where(x > 0, x * x, 0)\n"
    assert source.count(forward) == 1
    (tmp_path / "train_mlx.py").write_text(source.replace(forward, "    return mx.where(x > 0, x * x * x, 0)\n"))
    returncode, _, log = run_script(str(tmp_path / "train_mlx.py"), str(tmp_path), env=SMOKE_ENV)
    assert returncode == 1, log
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: the hand-written gradient of relu_squared (its .vjp) differs from autodiff"), log
    assert "Traceback" not in log and "step 00000" not in log  # one line, and before any training
