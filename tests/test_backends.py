"""backends/device.py, memory.py, flops.py: detection, hardware info, the memory model and tier table, peak FLOPS, device
utilities.
Macs and NVIDIA cards are faked by replacing the module's probes (_platform, _import, _run, _read_file)."""
import ast
import importlib
import os
import re
import subprocess
import sys
import types

import pytest

from backends import device, flops, memory
from backends.__main__ import print_hardware_summary
from conftest import ROOT, hiding, need

GENERATIONS = ("M1", "M2", "M3", "M4", "M5")
TIERS = ("base", "pro", "max", "ultra")
MEMORY_SIZES_GB = (8, 16, 18, 24, 32, 36, 48, 64, 96, 128, 192)


def fake_torch(mps=False, cuda=False, props=None, mps_bytes=(), calls=None):
    """A stand-in for the parts of torch that backends touches."""
    calls = [] if calls is None else calls
    mps_bytes = iter(mps_bytes)

    def get_device_properties(i):
        if props is None:
            raise RuntimeError("no device")
        return props
    return types.SimpleNamespace(
        backends=types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: mps)),
        cuda=types.SimpleNamespace(is_available=lambda: cuda, get_device_properties=get_device_properties,
                                   synchronize=lambda: calls.append("cuda"), max_memory_allocated=lambda: 3 * 2**30),
        mps=types.SimpleNamespace(synchronize=lambda: calls.append("mps"),
                                  driver_allocated_memory=lambda: next(mps_bytes)),
    )


def fake_mlx(metal=True):
    return types.SimpleNamespace(metal=types.SimpleNamespace(is_available=lambda: metal))


@pytest.fixture
def machine(monkeypatch):
    """Configure a fake machine: machine(platform, modules={name: module}, files={path: text}); a module or file
    not named is missing, and every command prints nothing (tests of Macs then patch _run with mac_run)."""
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)

    def configure(platform="linux", modules=None, files=None):
        modules, files = modules or {}, files or {}
        monkeypatch.setattr(device, "_platform", lambda: platform)
        monkeypatch.setattr(device, "_import", lambda name: modules.get(name))
        monkeypatch.setattr(device, "_run", lambda *args: "")
        monkeypatch.setattr(device, "_read_file", lambda path: files.get(path, ""))
    return configure


def mac_run(brand, memory_gb=16, cores=None, source="ioreg"):
    """A fake _run for a Mac: sysctl answers per key; the GPU core count comes from `source` only."""
    outputs = {"ioreg": f'+-o AGXAcceleratorG15X  <class AGXAccelerator>\n  |   "gpu-core-count" = {cores}\n',
               "system_profiler": f"Graphics/Displays:\n\n    Apple M:\n\n      Total Number of Cores: {cores}\n"}
    sysctl = {"machdep.cpu.brand_string": brand, "hw.memsize": str(memory_gb * 2**30) if memory_gb else ""}

    def _run(*args):
        if args[0] == "sysctl":
            return sysctl[args[2]] + "\n"
        return outputs[source] if cores is not None and args[0] == source else ""
    return _run

# ---------------------------------------------------------------------------
# Detection: environment variable
# ---------------------------------------------------------------------------

def test_invalid_backend_is_one_line_listing_the_valid_ones(machine, monkeypatch):
    machine()
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "rocm")
    with pytest.raises(SystemExit) as e:
        device.detect_backend()
    assert isinstance(e.value, device.BackendError)
    message = str(e.value)
    assert "\n" not in message and "'rocm'" in message
    assert all(b in message for b in device.BACKENDS)


@pytest.mark.parametrize("requested, modules, platform, expected", [
    ("mlx", {}, "darwin", "`uv sync --extra mlx`"),
    ("mlx", {"mlx.core": fake_mlx(metal=False)}, "darwin", "mlx.core.metal.is_available() is False"),
    ("mps", {}, "darwin", "`uv sync --extra torch`"),
    ("mps", {"torch": fake_torch(mps=False)}, "darwin", "torch.backends.mps.is_available() is False"),
    ("mps", {"torch": fake_torch(mps=False)}, "linux", "(MPS needs macOS)"),
    ("cuda", {}, "linux", "`uv sync --extra torch`"),
    ("cuda", {"torch": fake_torch(cuda=False)}, "linux",
     "cuda requested (AUTORESEARCH_BACKEND=cuda) but torch.cuda.is_available() is False"),
    ("cpu", {"mlx.core": fake_mlx()}, "linux",  # cpu is PyTorch's CPU
     "cpu requested (AUTORESEARCH_BACKEND=cpu) but torch is not installed: run `uv sync --extra torch`"),
])
def test_unusable_backend_says_why_and_how_to_install(machine, monkeypatch, requested, modules, platform, expected):
    machine(platform, modules)
    monkeypatch.setenv("AUTORESEARCH_BACKEND", requested)
    with pytest.raises(device.BackendError) as e:
        device.detect_backend()
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("requested, modules, platform, expected", [
    ("cpu", {"torch": fake_torch()}, "linux", "cpu"),
    (" MLX ", {"mlx.core": fake_mlx()}, "darwin", "mlx"),
    ("mlx", {"mlx.core": fake_mlx(metal=False)}, "linux", "mlx"),  # Linux MLX (CPU or CUDA build): only on request
    ("mps", {"torch": fake_torch(mps=True)}, "darwin", "mps"),
    ("cuda", {"torch": fake_torch(cuda=True)}, "linux", "cuda"),
    ("", {"torch": fake_torch(cuda=True)}, "linux", "cuda"),  # empty means auto
])
def test_requested_backend_that_works_is_returned(machine, monkeypatch, requested, modules, platform, expected):
    machine(platform, modules)
    monkeypatch.setenv("AUTORESEARCH_BACKEND", requested)
    assert device.detect_backend() == expected


@pytest.mark.parametrize("platform, modules, expected", [
    ("darwin", {"mlx.core": fake_mlx(), "torch": fake_torch(mps=True)}, "mlx"),
    ("darwin", {"mlx.core": fake_mlx(metal=False), "torch": fake_torch(mps=True)}, "mps"),
    ("darwin", {"torch": fake_torch(mps=True)}, "mps"),
    ("darwin", {"torch": fake_torch(mps=False)}, "cpu"),
    ("linux", {"torch": fake_torch(cuda=True), "mlx.core": fake_mlx()}, "cuda"),
    ("linux", {"torch": fake_torch(cuda=False)}, "cpu"),
    ("linux", {"torch": fake_torch(cuda=False), "mlx.core": fake_mlx()}, "cpu"),  # PyTorch's CPU is the faster one
    ("linux", {"mlx.core": fake_mlx()}, "mlx"),  # MLX's CPU (or CUDA) build when PyTorch is missing
])
def test_auto_preference_order(machine, platform, modules, expected):
    machine(platform, modules)
    assert device.detect_backend() == expected


# What `uv sync --extra ...` installed: none, torch (the torch extra), mlx, or both (all)
EXTRAS = {"none": (), "torch": ("torch",), "mlx": ("mlx.core",), "all": ("torch", "mlx.core")}


@pytest.mark.parametrize("platform", ["darwin", "linux"])
@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("requested", device.BACKENDS)
def test_every_install_and_backend_gives_a_backend_that_runs_or_one_line(machine, monkeypatch, platform, extras,
                                                                        requested):
    """A Mac with Metal and MPS, a Linux box without a GPU: whatever is installed and asked for, detect_backend
    returns a backend whose framework is installed, or one line; where installing would help, it names the command."""
    fakes = {"torch": fake_torch(mps=platform == "darwin"), "mlx.core": fake_mlx()}
    machine(platform, {name: fakes[name] for name in EXTRAS[extras]})
    monkeypatch.setenv("AUTORESEARCH_BACKEND", requested)
    needs = {"mlx": "mlx.core", "mps": "torch", "cuda": "torch", "cpu": "torch"}
    try:
        backend = device.detect_backend()
    except device.BackendError as e:
        message = str(e)
        assert "\n" not in message
        if requested == "auto":
            assert extras == "none"
            assert message == ("no backend can run here: " + "; ".join(
                f"{name} is not installed: run `uv sync --extra {extra}`"
                for name, extra in (("mlx", "mlx"), ("torch", "torch"))[::1 if platform == "darwin" else -1]))
        elif needs[requested] not in EXTRAS[extras]:
            extra = "mlx" if requested == "mlx" else "torch"
            assert message.endswith(f"is not installed: run `uv sync --extra {extra}`"), message
        else:  # installed, but this machine has no such device
            assert (requested, platform) in (("cuda", "darwin"), ("cuda", "linux"), ("mps", "linux")), message
            assert "is_available() is False" in message
        return
    assert needs[backend] in EXTRAS[extras]
    assert backend == requested or requested == "auto"
    if requested == "auto":  # the preference order
        order = ("mlx", "mps", "cpu") if platform == "darwin" else ("cpu", "mlx")
        assert backend == next(b for b in order if needs[b] in EXTRAS[extras])


def hide(tmp_path, *modules):
    """hiding() these modules, with no backend requested and an empty cache."""
    environ = {k: v for k, v in hiding(tmp_path, *modules).items() if k != "AUTORESEARCH_BACKEND"}
    return {**environ, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "empty")}


def run(args, env, **extra):
    """A trainer (named by its path in the repository) or `python -m backends`, run in the test's tmp_path (above the
    empty cache): a trainer that starts records its run in runs.jsonl where it runs, never the repository's."""
    args = [os.path.join(ROOT, arg) if arg.endswith(".py") else arg for arg in args]
    return subprocess.run([sys.executable, *args], cwd=os.path.dirname(env["AUTORESEARCH_CACHE_DIR"]),
                          capture_output=True, text=True, timeout=120, env={**env, **extra})


@pytest.mark.slow
def test_only_mlx_installed_for_real(tmp_path):
    """torch really unimportable: auto runs MLX, python -m backends says so, and asking for cpu is one line."""
    need("mlx")
    env = hide(tmp_path, "torch")
    assert run(["-c", "import torch"], env).returncode == 1  # the hiding works
    result = run(["-m", "backends"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "backend:            mlx"
    result = run(["train.py"], env)  # hands over to train_mlx.py, which needs no torch and stops at the empty cache
    assert result.stdout.splitlines()[0].startswith("backend: mlx -> handing over to train_mlx.py")
    assert result.returncode == 1 and result.stderr.splitlines() == [f"error: no data in {tmp_path}/empty/data: "
                                                                      f"run `uv run prepare.py` first"]
    for args in (["train.py"], ["-m", "backends"]):
        result = run(args, env, AUTORESEARCH_BACKEND="cpu")
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.splitlines() == ["cpu requested (AUTORESEARCH_BACKEND=cpu) but torch is not installed: "
                                              "run `uv sync --extra torch`"]


@pytest.mark.slow
@pytest.mark.parametrize("args", [["train.py"], ["train_mlx.py"], ["-m", "backends"]], ids=" ".join)
def test_no_framework_installed_for_real(tmp_path, args):
    result = run(args, hide(tmp_path, "torch", "mlx"))
    assert result.returncode == 1 and result.stdout == ""
    expected = ("no backend can run here: torch is not installed: run `uv sync --extra torch`; mlx is not installed: "
                "run `uv sync --extra mlx`")
    if args == ["train_mlx.py"]:
        expected = "error: mlx is not installed: run `uv sync --extra mlx`"
    assert result.stderr.splitlines() == [expected]


def installed(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name.split(".")[0]:
            raise
        return None


def auto_here():
    """The backend auto must pick on the machine running the tests, asked of the frameworks themselves rather than
    through backends' probes, in the order test_auto_preference_order checks: cpu on Linux without a GPU (CI), cuda
    on an NVIDIA box, mlx on a Mac with MLX. None where no framework is installed."""
    torch, mx = installed("torch"), installed("mlx.core")
    if sys.platform == "darwin":
        usable = {"mlx": mx and mx.metal.is_available(), "mps": torch and torch.backends.mps.is_available(),
                  "cpu": torch}
    else:
        usable = {"cuda": torch and torch.cuda.is_available(), "cpu": torch, "mlx": mx}
    return next((backend for backend, ok in usable.items() if ok), None)


def test_auto_on_this_machine(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    if auto_here() is None:
        with pytest.raises(device.BackendError):
            device.detect_backend()
    else:
        assert device.detect_backend() == auto_here()  # the real probes, nothing faked

# ---------------------------------------------------------------------------
# Hardware info
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("tier", TIERS)
def test_every_apple_chip_is_recognised(machine, monkeypatch, generation, tier):
    brand = f"Apple {generation}" + ("" if tier == "base" else f" {tier.capitalize()}")
    cores = flops.APPLE_GPU_CORES[generation][tier]
    machine("darwin")
    monkeypatch.setattr(device, "_run", mac_run(brand, memory_gb=64, cores=cores))
    hw = device.get_hardware_info("mlx")
    assert hw == {"chip": brand, "generation": generation, "tier": tier, "gpu_cores": cores,
                  "memory_gb": 64.0, "backend": "mlx"}


def test_gpu_cores_fall_back_to_system_profiler(machine, monkeypatch):
    machine("darwin")
    monkeypatch.setattr(device, "_run", mac_run("Apple M2 Pro", cores=19, source="system_profiler"))
    assert device.get_hardware_info("mps")["gpu_cores"] == 19


@pytest.mark.parametrize("brand, memory_gb, expected", [
    ("Apple processor", 24, {"chip": "Apple processor", "generation": None, "tier": "base", "memory_gb": 24.0}),
    ("Apple M7 Max", 256, {"generation": "M7", "tier": "max", "memory_gb": 256.0}),
    ("", None, {"chip": "unknown", "generation": None, "tier": "base", "gpu_cores": None,
                "memory_gb": device.DEFAULT_MEMORY_GB}),
    ("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", 32, {"generation": None, "tier": "cpu", "memory_gb": 32.0}),
])
def test_unknown_macs_get_safe_defaults(machine, monkeypatch, brand, memory_gb, expected):
    machine("darwin")
    monkeypatch.setattr(device, "_run", mac_run(brand, memory_gb=memory_gb))
    hw = device.get_hardware_info("cpu")
    assert {k: hw[k] for k in expected} == expected


def test_linux_reads_proc(machine):
    cpuinfo = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor\n\n"
               "processor\t: 1\n")
    meminfo = "MemTotal:       65536000 kB\nMemFree:        1000 kB\n"
    machine("linux", files={"/proc/cpuinfo": cpuinfo, "/proc/meminfo": meminfo})
    hw = device.get_hardware_info("cpu")
    assert hw == {"chip": "AMD EPYC 7763 64-Core Processor", "generation": None, "tier": "cpu", "gpu_cores": None,
                  "memory_gb": 65536000 / 2**20, "backend": "cpu"}


def test_unknown_linux_machine_does_not_crash(machine):
    machine("linux")  # no /proc files, no torch: an ARM board or a container with /proc hidden
    hw = device.get_hardware_info("cpu")
    assert (hw["chip"], hw["tier"], hw["memory_gb"]) == ("unknown", "cpu", device.DEFAULT_MEMORY_GB)


def test_this_machine(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    backend = auto_here() or pytest.skip("no framework installed: uv sync --extra all")
    hw = device.get_hardware_info()
    assert hw["backend"] == backend and hw["chip"] != ""
    assert 0.5 < hw["memory_gb"] < 4096
    mx = installed("mlx.core")
    on_gpu = backend == "cuda" or (backend == "mlx" and sys.platform != "darwin" and mx.cuda.is_available())
    if on_gpu:  # the card's name and memory, not the host's
        torch = installed("torch")
        assert hw["tier"] == "cuda" and hw["gpu_cores"] > 0
        if torch is not None and torch.cuda.is_available():
            assert hw["chip"] == torch.cuda.get_device_name(0)
    elif sys.platform == "darwin":
        assert hw["tier"] in TIERS + ("cpu",)
    else:
        assert hw["tier"] == "cpu" and hw["gpu_cores"] is None


def test_nvidia_via_torch(machine):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=85_022_736_384, multi_processor_count=132)
    machine("linux", modules={"torch": fake_torch(cuda=True, props=props)},
            files={"/proc/meminfo": "MemTotal:       131072000 kB\n"})
    hw = device.get_hardware_info("cuda")
    assert hw == {"chip": "NVIDIA H100 80GB HBM3", "generation": None, "tier": "cuda", "gpu_cores": 132,
                  "memory_gb": 85_022_736_384 / 2**30, "backend": "cuda"}
    assert flops.get_peak_flops(hw) == 989.5e12  # the original's H100_BF16_PEAK_FLOPS


def test_nvidia_probe_failure_keeps_host_figures(machine):
    machine("linux", modules={"torch": fake_torch(cuda=True, props=None)},
            files={"/proc/meminfo": "MemTotal:       16777216 kB\n"})
    hw = device.get_hardware_info("cuda")
    assert (hw["tier"], hw["memory_gb"]) == ("cpu", 16.0)

# ---------------------------------------------------------------------------
# Memory model
# ---------------------------------------------------------------------------

ORIGINAL = (64, 128)  # the original's ASPECT_RATIO and HEAD_DIM: the model the calibration points below measured
GATE_CHANNELS = 32    # the original's value-embedding gate width
SHIPPED = memory.trainer_architecture("mps")  # train.py's ASPECT_RATIO and HEAD_DIM, as the trainer passes them


def test_parameter_count_matches_the_original():
    # the original prints num_params_M: 50.3
    assert memory.count_parameters(8, *ORIGINAL, vocab_size=8192, ve_gate_channels=GATE_CHANNELS) == 50_332_176
    # depth 1: d 128, one head, one value embedding: 12 d^2 + 32 + 3 * V * d + 2
    assert memory.count_parameters(1, *ORIGINAL, vocab_size=16, ve_gate_channels=GATE_CHANNELS) == \
        12 * 128**2 + 32 + 3 * 16 * 128 + 2
    # the memory estimate leaves the gates out: 32 inputs per head on each layer with a value embedding
    assert memory.count_parameters(8, *ORIGINAL) == 50_332_176 - 4 * 32 * 4


# Peaks measured on one H100 (torch.cuda.max_memory_allocated, GiB) for a re-implementation of the original GPT,
# V 8192, T 2048: the points backends' comments cite. The estimate must stay above each and not far above.
CALIBRATION = [
    # backend, depth, device_batch_size, measured GiB, how far above is still acceptable
    ("cuda", 8, 128, 43.94, 1.15),  # compiled; the original's README: 45060.2 MiB
    ("cuda", 8, 64, 22.26, 1.15),
    ("cuda", 4, 128, 14.08, 1.20),
    ("mps", 8, 16, 22.59, 1.35),    # eager, math-path attention, fp32: what MPS does on an M1
    ("mps", 8, 8, 11.61, 1.35),
    ("mps", 4, 8, 4.46, 1.35),
    ("mlx-cuda", 8, 16, 7615.5 / 1024, 1.25),  # MLX's CUDA build on an H200: peak_vram_mb of 60-second runs...
    ("mlx-cuda", 8, 128, 52161.0 / 1024, 1.25),
    ("mlx-cuda", 8, 32, 13762.4 / 1024, 1.25),  # ...and of benchmarks/bench_mlx_memory.py
    ("mlx-cuda", 8, 64, 26254.6 / 1024, 1.25),
    ("mlx-cuda", 4, 32, 5886.3 / 1024, 1.25),
]
MLX_ON_CUDA = {"tier": "cuda", "memory_gb": 140.4, "backend": "mlx"}


@pytest.mark.parametrize("backend, depth, batch, measured, slack", CALIBRATION)
def test_estimate_errs_high_against_measured_peaks(backend, depth, batch, measured, slack):
    if backend == "mlx-cuda":
        estimate = memory.estimate_memory_gb(depth, batch, *ORIGINAL, backend="mlx", hw=MLX_ON_CUDA)
    else:
        estimate = memory.estimate_memory_gb(depth, batch, *ORIGINAL, backend=backend)
    assert measured <= estimate <= slack * measured


def test_estimate_grows_with_size_and_eager_needs_more_than_compiled():
    est = lambda depth, batch, **options: memory.estimate_memory_gb(depth, batch, *ORIGINAL, **options)
    assert est(4, 8) < est(4, 16) < est(8, 16) < est(8, 16, seq_len=4096)
    assert est(8, 16) == est(8, 16, backend="cpu")  # eager PyTorch
    assert est(8, 16, backend="cuda") < est(8, 16)
    # MLX keeps one layer's attention scores at a time on Metal, where eager PyTorch keeps every layer's
    metal = {"tier": "max", "generation": "M3", "backend": "mlx"}
    assert est(8, 16, backend="mlx", hw=metal) < est(8, 16)
    assert est(8, 16, backend="mlx", hw=metal) < est(8, 16, backend="mlx", hw={**metal, "generation": "M1"})  # fp32
    assert est(8, 16, backend="mlx", hw=metal) > est(8, 16, backend="mlx", hw=MLX_ON_CUDA) + 1  # + its scores
    assert est(8, 16, vocab_size=32768) > est(8, 16)

def test_the_estimate_and_the_defaults_follow_the_architecture_they_are_given():
    narrow, original, wide = (memory.estimate_memory_gb(8, 16, aspect_ratio, 128) for aspect_ratio in (32, 64, 128))
    assert narrow < original < wide
    assert memory.estimate_memory_gb(8, 16, 64, 64) > original  # the same width in twice the heads: more scores
    hw = {"tier": "max", "memory_gb": 36, "backend": "mps", "generation": "M3"}
    wider = memory.suggest_hyperparameters(hw, 128, 128)
    assert wider["device_batch_size"] < memory.suggest_hyperparameters(hw, *ORIGINAL)["device_batch_size"]


@pytest.mark.parametrize("trainer", ["train.py", "train_mlx.py"])
def test_the_trainers_pass_their_own_architecture_to_the_defaults(trainer):
    with open(os.path.join(ROOT, trainer)) as f:
        body = [ast.unparse(node) for node in ast.parse(f.read()).body if isinstance(node, ast.Assign)]
    call = body.index("SUGGESTED = suggest_hyperparameters(HW, ASPECT_RATIO, HEAD_DIM)")
    assert [line for line in body[:call] if line.startswith(("ASPECT_RATIO =", "HEAD_DIM ="))] == [
        f"ASPECT_RATIO = {SHIPPED[0]}", f"HEAD_DIM = {SHIPPED[1]}"]  # assigned before the call, as read from source


def test_python_m_backends_reads_the_architecture_from_the_trainer_that_runs(monkeypatch, tmp_path, capsys):
    assert memory.trainer_architecture("mlx") == memory.trainer_architecture("cpu")  # the twins agree
    (tmp_path / "train.py").write_text("ASPECT_RATIO = 96  # an agent's edit\nHEAD_DIM = 64\n")
    (tmp_path / "train_mlx.py").write_text("ASPECT_RATIO = 2 * 48\n")
    monkeypatch.setattr(memory, "ROOT", str(tmp_path))
    assert memory.trainer_architecture("mps") == (96, 64)
    with pytest.raises(device.BackendError, match="train_mlx.py must assign ASPECT_RATIO and HEAD_DIM plain numbers"):
        memory.trainer_architecture("mlx")
    hw = {"chip": "Apple M3 Max", "generation": "M3", "tier": "max", "gpu_cores": 40, "memory_gb": 36.0,
          "backend": "mps"}
    print_hardware_summary(hw)
    edited = capsys.readouterr().out
    monkeypatch.undo()
    print_hardware_summary(hw)
    shipped = capsys.readouterr().out
    estimate = lambda out: re.search(r"memory_estimate_gb: (\S+)", out).group(1)
    assert estimate(edited) != estimate(shipped)


# ---------------------------------------------------------------------------
# Tier table
# ---------------------------------------------------------------------------

def check_config(hw, fraction):
    config = memory.suggest_hyperparameters(hw, *SHIPPED)
    depth, batch, total = config["depth"], config["device_batch_size"], config["total_batch_size"]
    assert depth >= 1 and batch >= 1
    assert total % (batch * memory.MAX_SEQ_LEN) == 0
    assert memory.estimate_memory_gb(depth, batch, *SHIPPED, backend=hw["backend"], hw=hw) <= fraction * hw["memory_gb"]
    return config


@pytest.mark.parametrize("memory_gb", MEMORY_SIZES_GB)
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("backend", ["mps", "mlx"])
def test_every_apple_tier_fits_half_of_memory(tier, memory_gb, backend):
    check_config({"tier": tier, "memory_gb": memory_gb, "backend": backend, "generation": "M3"}, 0.5)


@pytest.mark.parametrize("memory_gb", MEMORY_SIZES_GB)
def test_cpu_fits_half_of_memory(memory_gb):
    check_config({"tier": "cpu", "memory_gb": memory_gb, "backend": "cpu"}, 0.5)


def test_cuda_keeps_the_original_configuration():
    config = check_config({"tier": "cuda", "memory_gb": 80, "backend": "cuda"}, 0.85)
    assert config == {"depth": 8, "device_batch_size": 128, "total_batch_size": 2**19}


def test_roomy_machines_keep_their_tier_row_and_small_ones_shrink():
    for tier in TIERS:
        depth, batch, total = memory.TIER_DEFAULTS[tier]
        assert memory.suggest_hyperparameters({"tier": tier, "memory_gb": 192, "backend": "mps"}, *SHIPPED) == \
            {"depth": depth, "device_batch_size": batch, "total_batch_size": total}
    small = memory.suggest_hyperparameters({"tier": "base", "memory_gb": 8, "backend": "mps"}, *SHIPPED)
    assert small["device_batch_size"] < memory.TIER_DEFAULTS["base"][1]


def test_mac_forced_onto_cpu_gets_the_cpu_row():
    hw = {"tier": "max", "memory_gb": 128, "backend": "cpu", "generation": "M4"}
    assert memory.suggest_hyperparameters(hw, *SHIPPED)["depth"] == memory.TIER_DEFAULTS["cpu"][0]

# ---------------------------------------------------------------------------
# Peak FLOPS
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("chip", sorted(flops.APPLE_PEAK_FLOPS))
def test_every_apple_chip_has_a_peak(chip):
    generation, tier = chip
    hw = {"tier": tier, "generation": generation, "gpu_cores": None}
    assert flops.get_peak_flops(hw) == flops.APPLE_PEAK_FLOPS[chip] > 0
    fewer = dict(hw, gpu_cores=flops.APPLE_GPU_CORES[generation][tier] - 2)  # a binned-down GPU
    assert 0 < flops.get_peak_flops(fewer) < flops.APPLE_PEAK_FLOPS[chip]


def test_apple_peaks_match_apples_published_fp32_figures():
    # Apple's own TFLOPS for full chips (press releases); bf16 is taken at the FP32 rate on M1-M4
    published = {("M1", "base"): 2.6, ("M1", "max"): 10.4, ("M2", "base"): 3.6, ("M2", "max"): 13.6,
                 ("M2", "ultra"): 27.2}
    for chip, tflops in published.items():
        assert flops.APPLE_PEAK_FLOPS[chip] / 1e12 == pytest.approx(tflops, rel=0.03)


@pytest.mark.parametrize("name, expected", [(name, flops) for name, flops in flops.NVIDIA_PEAK_FLOPS] + [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GH200 480GB", 989.5e12),
    ("NVIDIA A10G", 125e12), ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", 165e12),
])
def test_nvidia_names_match_their_datasheet_peak(name, expected):
    assert flops.get_peak_flops({"tier": "cuda", "chip": name}) == expected


@pytest.mark.parametrize("hw, label", [
    ({"tier": "cuda", "chip": "NVIDIA Future GPU"}, "estimate"),
    ({"tier": "max", "generation": "M9"}, "taken as M5"),
    ({"tier": "base", "generation": None}, "taken as M5"),
    ({"tier": "cpu"}, "estimate"),
    ({}, "estimate"),
])
def test_unknown_chips_get_a_labelled_estimate(hw, label):
    peak, source = flops.peak_flops_and_source(hw)
    assert peak > 0 and label in source

# ---------------------------------------------------------------------------
# Device utilities
# ---------------------------------------------------------------------------

def test_cpu_peak_memory_is_a_plausible_monotone_peak():
    first = device.get_peak_memory_mb("cpu")
    block = bytearray(64 * 2**20)  # touched: counts toward RSS
    second = device.get_peak_memory_mb("cpu")
    del block
    third = device.get_peak_memory_mb("cpu")
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert 10 < first <= second <= third < total_mb  # a Python process is > 10 MiB: catches a KiB/bytes mix-up


def test_mps_peak_is_a_running_maximum(monkeypatch):
    monkeypatch.setattr(device, "_mps_peak_bytes", 0)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(mps_bytes=[100 * 2**20, 300 * 2**20, 200 * 2**20, 50 * 2**20]))
    for _ in range(3):
        device.sample_memory("mps")
    assert device.get_peak_memory_mb("mps") == 300.0  # current usage fell to 50 MiB: the peak stays
    device.sample_memory("cpu")  # a no-op off MPS


def test_cuda_peak_and_syncs(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "torch", fake_torch(calls=calls))
    assert device.get_peak_memory_mb("cuda") == 3 * 1024.0
    device.sync_device("cuda")
    device.sync_device("mps")
    device.sync_device("cpu")
    assert calls == ["cuda", "mps"]


def test_mlx_peak_and_sync_with_real_mlx():
    mx = need("mlx.core")
    a = mx.ones((1024, 1024, 8))  # 32 MiB of float32
    mx.eval(a)
    device.sync_device("mlx")
    assert device.get_peak_memory_mb("mlx") >= 32.0

# ---------------------------------------------------------------------------
# Summary and CLI
# ---------------------------------------------------------------------------

def test_summary_of_a_fake_mac(capsys):
    print_hardware_summary({"chip": "Apple M3 Max", "generation": "M3", "tier": "max", "gpu_cores": 40,
                            "memory_gb": 64.0, "backend": "mlx"})
    out = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert out["chip"].strip() == "Apple M3 Max" and out["gpu_cores"].strip() == "40"
    assert out["depth"].strip() == "8" and out["device_batch_size"].strip() == "32"  # MLX's own memory profile
    assert "estimate" in out["peak_tflops_bf16"] and "14.3" in out["peak_tflops_bf16"]


def run_module(**env):
    environ = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_BACKEND"}
    return subprocess.run([sys.executable, "-m", "backends"], cwd=ROOT, capture_output=True, text=True,
                          env={**environ, **env}, timeout=120)


def test_importing_backends_imports_neither_framework():
    # A Mac may have only one of torch / mlx: both are imported lazily, inside the functions that need them
    code = ("import sys, backends.device, backends.flops, backends.memory, backends.polar_express, backends.record\n"
            "print(sorted(m for m in ('torch', 'mlx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.slow
def test_frozen_objects_are_freed_at_exit_so_nothing_prints_after_the_summary():
    """The trainers freeze the GC after their first step (as the original). torch imports triton with torch._dynamo
    (here through the meta-device init); frozen, its objects outlive the last collection and nanobind reports them as
    ~30 lines of "leaked" at exit. Importing backends.device makes the exit collection free them instead."""
    need("torch")
    code = ("import gc, backends.device, torch\n"
            "with torch.device('meta'):\n"
            "    torch.nn.Embedding(8, 4)\n"
            "gc.freeze()\n"
            "print('summary')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "summary\n"
    assert result.stderr == ""


@pytest.mark.slow
def test_python_m_backends_prints_the_summary():
    result = run_module()
    assert result.returncode == 0, result.stderr
    keys = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert keys == ["backend", "chip", "generation", "tier", "gpu_cores", "memory_gb", "depth", "device_batch_size",
                    "total_batch_size", "memory_estimate_gb", "peak_tflops_bf16"]
    assert result.stdout.splitlines()[0] == f"backend:            {auto_here()}"
    # the peak FLOPS say where they come from: an estimate on a CPU or a Mac, the datasheet on a known NVIDIA card
    peak = result.stdout.splitlines()[-1]
    assert re.fullmatch(r"peak_tflops_bf16: +\d+\.\d \((estimate: .+|NVIDIA datasheet, .+, dense bf16)\)", peak), peak
    if "tier:               cpu" in result.stdout.splitlines():
        assert "(estimate: " in peak


def test_python_m_backends_bad_env_is_one_line_and_nonzero():
    result = run_module(AUTORESEARCH_BACKEND="metal")
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "choose one of auto, mlx, mps, cuda, cpu" in result.stderr


# ---------------------------------------------------------------------------
# Compiler caches
# ---------------------------------------------------------------------------

def test_compiler_caches_go_to_the_autoresearch_cache_unless_the_user_chose(monkeypatch, tmp_path):
    mx = need("mlx.core")
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    device.keep_compiler_caches(str(tmp_path))
    assert os.environ["MLX_PTX_CACHE_DIR"] == str(tmp_path / "compiled" / f"mlx-{mx.__version__}-ptx")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled" / "torchinductor")
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "/elsewhere/ptx")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere/inductor")
    device.keep_compiler_caches(str(tmp_path))
    assert (os.environ["MLX_PTX_CACHE_DIR"], os.environ["TORCHINDUCTOR_CACHE_DIR"]) == ("/elsewhere/ptx",
                                                                                     "/elsewhere/inductor")


def test_mlx_cuda_graphs_are_kept_small_off_macos_unless_the_user_chose(monkeypatch):
    # MLX's CUDA build holds every input of up to 11 queued CUDA graphs of 1000 MB each (H100/H200); Metal keeps
    # its own small command buffers, so macOS is left alone.
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    monkeypatch.setattr(device, "_platform", lambda: "darwin")
    device.bound_mlx_graph_memory()
    assert "MLX_MAX_MB_PER_BUFFER" not in os.environ
    monkeypatch.setattr(device, "_platform", lambda: "linux")
    device.bound_mlx_graph_memory()
    assert os.environ["MLX_MAX_MB_PER_BUFFER"] == str(device.MLX_GRAPH_MB)
    monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", "400")
    device.bound_mlx_graph_memory()
    assert os.environ["MLX_MAX_MB_PER_BUFFER"] == "400"



# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------

def test_backends_is_split_by_concern_and_the_old_names_are_gone():
    import backends
    assert [name for name, value in vars(backends).items()
            if not name.startswith("__") and not isinstance(value, types.ModuleType)] == []  # nothing re-exported
    assert not os.path.exists(os.path.join(ROOT, "backends", "muon_mps.py"))  # muon_torch.py serves CUDA and CPU too
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    old = [re.compile(pattern) for pattern in (r"muon_mps", r"\bTIER\[", r"\bTIER =", r"analysis\.counts\b",
                                                 r"from backends import (?!device|flops|memory|muon_|polar_|record|"
                                                 r"calibrate|gradcheck|jsonl)", r"extra mps --")]
    me = os.path.relpath(__file__, ROOT)
    for path in tracked:
        if path.endswith((".py", ".md", ".toml")) and path != me:
            with open(os.path.join(ROOT, path)) as f:
                text = f.read()
            assert [p.pattern for p in old if p.search(text)] == [], path


def test_the_torch_extra_installs_pytorch_and_mps_stays_its_alias():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert [r for r in extras["torch"] if r.startswith("torch")] == extras["torch"]
    assert extras["mps"] == ["autoresearch-mac[torch]"]  # the extra's first name: existing installs keep working
    assert extras["all"] == ["autoresearch-mac[torch,mlx]"]
    assert device.INSTALL["torch"] == "uv sync --extra torch"
