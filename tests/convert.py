"""Test helper: move weights between the PyTorch GPT (train.py) and the MLX GPT (train_mlx.py).

Both models use the same parameter names (the PyTorch state_dict keys are the MLX tree_flatten paths), so a
conversion is a rename-free copy. RoPE has no table to copy: train.py precomputes cos/sin from the same formula
that mx.fast.rope evaluates in its kernel, and test_parity.py checks the two rotations agree."""
import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map_with_path


def torch_to_mlx(torch_model, mlx_model):
    """Copy every parameter of torch_model into mlx_model, keeping each MLX parameter's dtype."""
    mlx_params = dict(tree_flatten(mlx_model.parameters()))
    state = torch_model.state_dict()
    assert set(state) == set(mlx_params), f"parameter names differ: {sorted(set(state) ^ set(mlx_params))}"
    # tree_map_with_path keeps the model's own structure (tree_unflatten would turn "value_embeds.1" into a list)
    new = tree_map_with_path(lambda k, p: mx.array(state[k].detach().float().cpu().numpy()).astype(p.dtype),
                             mlx_model.parameters())
    mlx_model.update(new)
    mx.eval(mlx_model.parameters())


def mlx_to_torch(mlx_model, torch_model):
    """Copy every parameter of mlx_model into torch_model, keeping each PyTorch parameter's dtype."""
    mlx_params = dict(tree_flatten(mlx_model.parameters()))
    state = torch_model.state_dict()
    assert set(state) == set(mlx_params), f"parameter names differ: {sorted(set(state) ^ set(mlx_params))}"
    new = {k: torch.from_numpy(np.array(mlx_params[k].astype(mx.float32))).to(state[k].dtype) for k in state}
    torch_model.load_state_dict(new)
