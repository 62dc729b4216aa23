"""Test helper: train.py's GPT under bf16 autocast keeps bf16 where the original does, on any device.

CUDA autocast has run rms_norm in float32 since PyTorch 2.12 (it returns float32); CPU and MPS autocast, and CUDA
before 2.12, leave it alone. So that every device tests the float32 path, `float32_rms_norm` installs CUDA's rule
for the device's autocast wherever PyTorch has none: the input cast to float32, the op run without autocast. Left to
that rule, a bare F.rms_norm turns the residual stream, q and k float32 while v stays bf16."""
import contextlib
from unittest import mock

import torch

import train

TINY = dict(sequence_len=64, vocab_size=512, n_layer=4, n_head=2, n_kv_head=2, n_embd=128, window_pattern="SSSL")
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA", "mps": "AutocastMPS"}


@contextlib.contextmanager
def float32_rms_norm(device_type):
    """Within: bf16 autocast on device_type runs rms_norm in float32, as CUDA's autocast does since PyTorch 2.12."""
    key = AUTOCAST_KEYS[device_type]
    if torch._C._dispatch_has_kernel_for_dispatch_key("aten::rms_norm", key):
        yield  # PyTorch's own rule (CUDA, 2.12 and later)
        return

    def rms_norm(input, normalized_shape, weight=None, eps=None):
        with torch.autocast(device_type, enabled=False):
            return torch.rms_norm(input.float(), normalized_shape, None if weight is None else weight.float(), eps)

    library = torch.library.Library("aten", "IMPL")
    library.impl("rms_norm", rms_norm, key)
    try:
        yield
    finally:
        library._destroy()  # the registration goes with it


def norm_probe():
    """bf16 rows and what RMSNorm must make of them: F.rms_norm's own result for a bf16 input (PyTorch 2.11 on
    CUDA, 2.15 on the CPU, compiled or not), float32 math with float32's eps, returned in bf16. A row of 1e-2
    tells float32's eps (1.2e-7: ~1.0 out) from bf16's (7.8e-3: 0.11 out); a row of 1e-4 tells it from no eps
    at all (0.28 out, not 1.0)."""
    C = 128
    x = torch.stack([torch.full((C,), 1e-2), torch.full((C,), 1e-4), torch.randn(C, generator=torch.Generator().manual_seed(0))])
    x64 = x.bfloat16().double()
    expected = x64 / (x64.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()
    return x.bfloat16(), expected.bfloat16().double()


def check_norm(device):
    """Under bf16 autocast, norm() returns bf16 and matches norm_probe's expectation."""
    x, expected = norm_probe()
    with float32_rms_norm(torch.device(device).type), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        y = train.norm(x.to(device))
    assert y.dtype == torch.bfloat16, y.dtype
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-2, atol=0)


def check_bf16_forward(device):
    """The residual stream (every block's input and output) and q, k, v at attention are bf16; the logits float32."""
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(**TINY)).to(device)
    model.init_weights(dtype=torch.bfloat16)
    residual = []
    hooks = [block.register_forward_hook(lambda mod, inp, out: residual.append((inp[0].dtype, out.dtype)))
             for block in model.transformer.h]
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["sequence_len"]), device=device)
    try:
        with mock.patch.object(train, "attention", wraps=train.attention) as attention, \
                float32_rms_norm(torch.device(device).type), \
                torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            logits = model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    qkv = [tuple(t.dtype for t in call.args[:3]) for call in attention.call_args_list]
    assert residual == [(torch.bfloat16, torch.bfloat16)] * TINY["n_layer"], residual
    assert qkv == [(torch.bfloat16,) * 3] * TINY["n_layer"], qkv
    assert logits.dtype == torch.float32  # logits (and the loss) in float32, as the original
    return model, idx


def check_compiled(model, idx, device):
    """torch.compile'd forward and backward under bf16 autocast run (flex_attention, CUDA's windowed path, refuses
    q/k/v of mixed dtypes) and give the eager loss."""
    device_type = torch.device(device).type
    with float32_rms_norm(device_type), torch.autocast(device_type, dtype=torch.bfloat16):
        eager = model(idx, idx)
        compiled = torch.compile(model, dynamic=False)(idx, idx)
    compiled.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
