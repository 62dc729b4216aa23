"""python -m backends: print the detected backend, chip, tier and the defaults that follow from them (the trainer's
architecture read from its source, so an edit of ASPECT_RATIO or HEAD_DIM shows here too)."""
from backends.device import get_hardware_info
from backends.flops import peak_flops_and_source
from backends.memory import estimate_memory_gb, memory_budget_gb, memory_fraction, suggest_hyperparameters, \
    trainer_architecture


def print_hardware_summary(hw=None):
    """Print what was detected and the defaults that follow from it, one `key: value` per line."""
    hw = hw or get_hardware_info()
    architecture = trainer_architecture(hw["backend"])
    config = suggest_hyperparameters(hw, *architecture)
    estimate = estimate_memory_gb(config["depth"], config["device_batch_size"], *architecture, backend=hw["backend"],
                                  hw=hw)
    budget = memory_budget_gb(hw)
    flops, source = peak_flops_and_source(hw)
    dash = lambda v: "-" if v is None else v
    print(f"backend:            {hw['backend']}")
    print(f"chip:               {hw['chip']}")
    print(f"generation:         {dash(hw['generation'])}")
    print(f"tier:               {hw['tier']}")
    print(f"gpu_cores:          {dash(hw['gpu_cores'])}")
    print(f"memory_gb:          {hw['memory_gb']:.1f}")
    print(f"depth:              {config['depth']}")
    print(f"device_batch_size:  {config['device_batch_size']}")
    print(f"total_batch_size:   {config['total_batch_size']}")
    print(f"memory_estimate_gb: {estimate:.1f} (budget {budget:.1f} = {memory_fraction(hw):.0%} of memory_gb)")
    print(f"peak_tflops_bf16:   {flops / 1e12:.1f} ({source})")


if __name__ == "__main__":
    print_hardware_summary()
