"""
The hand-written gradients of train_mlx.py, checked against MLX's own autodiff as the run starts.

A few operations of the MLX model carry a gradient written by hand (a VJP), to save memory or to sum in float32. Such
a gradient fits one forward only: edit the forward and not its VJP, and training goes on with wrong gradients,
silently. So train_mlx.py declares them with @hand_gradient, which is mx.custom_function keeping the forward, and
check_gradients runs the model once on a short row, then compares each operation's hand-written gradient with
autodiff of its own forward, on random inputs of the shapes and dtypes the model gave it. When they disagree the run
stops with one line.
"""

import sys

import mlx.core as mx

# Largest gap between the two gradients, relative to autodiff's largest entry. Both compute in the model's dtype by
# different routes: in bf16 they differ by a few roundings (1e-4 to 4e-4 relative here); a wrong gradient by O(1).
TOLERANCE = 0.01
_first_calls = None  # while check_gradients runs the model: each hand_gradient operation -> its first call's arguments


class hand_gradient:
    """@hand_gradient instead of @mx.custom_function, with @op.vjp to give the VJP, as there. Only the first output's
    gradient is checked: outputs past it are what the forward keeps for its VJP, and no gradient flows through them."""

    def __init__(self, forward):
        self.forward = forward
        self.custom = mx.custom_function(forward)
        self.__name__, self.__doc__ = forward.__name__, forward.__doc__

    def vjp(self, vjp):
        self.custom.vjp(vjp)
        return vjp

    def __call__(self, *args):
        if _first_calls is not None:
            _first_calls.setdefault(self, args)
        return self.custom(*args)


def gradient_error(op, args, key):
    """How far op's hand-written gradient is from autodiff of its forward, at random floating-point inputs of the
    shapes and dtypes of args (the other arguments as given) and a random cotangent: max |hand - autodiff| / max
    |autodiff| over every input, in float32."""
    floats = [i for i, a in enumerate(args) if isinstance(a, mx.array) and mx.issubdtype(a.dtype, mx.floating)]
    keys = mx.random.split(key, len(floats) + 1)
    primals = [mx.random.normal(args[i].shape, key=k).astype(args[i].dtype) for i, k in zip(floats, keys)]

    def first_output(fn):
        def f(*primals):
            full = list(args)
            for i, a in zip(floats, primals):
                full[i] = a
            out = fn(*full)
            return out[0] if isinstance(out, (tuple, list)) else out
        return f

    out = first_output(op.forward)(*primals)
    cotangent = mx.random.normal(out.shape, key=keys[-1]).astype(out.dtype)
    _, autodiff = mx.vjp(first_output(op.forward), primals, [cotangent])
    _, hand = mx.vjp(first_output(op.custom), primals, [cotangent])
    gap = max(mx.abs(h.astype(mx.float32) - a.astype(mx.float32)).max().item() for h, a in zip(hand, autodiff))
    scale = max(mx.abs(a.astype(mx.float32)).max().item() for a in autodiff)
    return gap / max(scale, 1e-30)


def check_gradients(model, vocab_size, tokens=16):
    """Call model(x, y) once on `tokens` random tokens, then check the hand-written gradient of every @hand_gradient
    operation it called; stop the run with one line naming the first that disagrees with autodiff of its forward.
    Returns the names of the operations checked. Uses keys of its own: the run's random state is left as it was."""
    global _first_calls
    key = mx.random.key(0)
    idx = mx.random.randint(0, vocab_size, (1, tokens), key=key)
    _first_calls = {}
    try:
        mx.eval(model(idx, idx))
        calls = _first_calls
    finally:
        _first_calls = None
    for op, args in calls.items():
        try:
            error = gradient_error(op, args, key)
            problem = f"differs from autodiff of its forward by {error:.0%}" if error > TOLERANCE else None
        except Exception as e:  # a VJP written for another forward may not even run: shapes or arguments differ
            problem = f"fails to run ({type(e).__name__}: {' '.join(str(e).split())})"
        if problem:
            sys.exit(f"error: the hand-written gradient of {op.__name__} (its .vjp) {problem}: make the .vjp match the "
                     f"forward, or remove both @hand_gradient and the .vjp to let MLX differentiate it")
    return [op.__name__ for op in calls]
