"""README.md, program.md and docs/ are contracts too. Every shell command in them is listed in COMMANDS with the
test or CI step that runs it, and the ones nothing else runs are run here: `python -m backends`, `prepare.py --help`,
the install commands (as a dry run), the agent's git workflow and its grep lines against a real run.log. The
tier table, the example outputs and the summary keys they show are compared with what the code produces. README
and program.md stay short (an agent pays for program.md's every word each night), and no document points outside
the repository."""
import contextlib
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from backends import device, memory
from backends.__main__ import print_hardware_summary
from conftest import ROOT

README = os.path.join(ROOT, "README.md")
PROGRAM = os.path.join(ROOT, "program.md")
CI_RUN = os.path.join(ROOT, ".ci", "run")
DOCS_DIR = os.path.join(ROOT, "docs")
BACKENDS_DOC = os.path.join(DOCS_DIR, "backends.md")
TIERS_DOC = os.path.join(DOCS_DIR, "memory-and-tiers.md")
DATASETS_DOC = os.path.join(DOCS_DIR, "datasets.md")
RUN_RECORD_DOC = os.path.join(DOCS_DIR, "run-record.md")
FLEET_DOC = os.path.join(DOCS_DIR, "fleet.md")
DOCS = [README, PROGRAM] + sorted(glob.glob(os.path.join(DOCS_DIR, "*.md")))
README_MAX_WORDS = 2000   # the original's README is about 1,200
PROGRAM_MAX_WORDS = 1500  # the agent reads all of it at the start of every night

# ---------------------------------------------------------------------------
# Every command in the docs, and where it runs
# ---------------------------------------------------------------------------

# "path::name" is a test or fixture that runs the command (or, where the docs name a Mac-only backend, the same
# command on the CPU); ".ci/run" means the command is a line of the CI script. Nothing else is accepted, except
# the one command below that needs the internet.
NOT_RUN = "not run: the uv installer downloads from astral.sh; .ci/run installs uv from PyPI instead"
TIMEOUT_TEST = "tests/test_docs.py::test_timeout_stops_a_run_and_leaves_a_crash_record"
FLEET_SETUP = "tests/test_hub.py::test_the_readmes_fleet_setup_makes_a_hub_that_refuses_rewrites"
FLEET_NIGHT = "tests/test_hub.py::test_program_mds_fleet_commands_in_a_night_of_two_agents"
COMMANDS = {
    # README.md and docs/
    "uv run train.py": ("tests/conftest.py::torch_run", "tests/conftest.py::mlx_run"),
    "uv run pytest -v": (".ci/run",),
    'uv run pytest -m "not slow"': ("tests/test_suite.py::test_the_fast_loop_keeps_a_test_of_every_file",),
    "AUTORESEARCH_STEPS=200 uv run train.py":
        ("tests/test_e2e.py::test_fixed_work_runs_n_steps_and_repeats_its_val_bpb_on_a_loaded_machine",),
    "curl -LsSf https://astral.sh/uv/install.sh | sh": (NOT_RUN,),
    "uv sync --extra mlx": ("tests/test_docs.py::test_install_commands_resolve_from_the_lockfile",),
    "uv sync --extra torch": ("tests/test_docs.py::test_install_commands_resolve_from_the_lockfile",),
    "uv sync --extra all": ("tests/test_docs.py::test_install_commands_resolve_from_the_lockfile",),
    "uv sync --extra torch --compile-bytecode": ("tests/test_docs.py::test_install_commands_resolve_from_the_lockfile",),
    "uv sync --locked --extra all --compile-bytecode": (".ci/run",),
    "uv run prepare.py": ("tests/conftest.py::prepared_cache",),
    "uv run prepare.py --source ~/corpus": ("tests/test_prepare.py::test_source_cli_builds_a_working_cache",),
    "uv run prepare.py --dataset tinystories": ("tests/test_datasets.py::two_datasets",),
    "uv run prepare.py --list": ("tests/test_datasets.py::test_list_shows_sizes_and_what_is_prepared",),
    "uv run prepare.py --help": ("tests/test_docs.py::test_prepare_help_lists_every_option_the_readme_names",),
    "uv run python -m backends": ("tests/test_docs.py::test_python_m_backends_prints_the_fields_the_readme_shows",),
    "AUTORESEARCH_BACKEND=mps uv run train.py": ("tests/test_backends.py::test_requested_backend_that_works_is_returned",
                                                 "tests/conftest.py::torch_run"),
    "uv run train_mlx.py": ("tests/test_e2e.py::test_missing_dataset_is_a_one_line_error",
                            "tests/test_e2e.py::test_nan_loss_prints_fail_and_exits_1"),
    # program.md
    "git checkout -b autoresearch/<tag>": ("tests/test_docs.py::test_git_workflow_keeps_and_discards_commits",),
    "printf 'commit\\tval_bpb\\tmemory_gb\\tstatus\\tdescription\\n' > results.tsv":
        ("tests/test_docs.py::test_git_workflow_keeps_and_discards_commits",),
    "uv run train.py > run.log 2>&1": ("tests/conftest.py::torch_run",),  # the original's, in the Differences table
    "uv run analysis.py": ("tests/test_analysis.py::test_report_text",),
    "uv run analysis.py --json": ("tests/test_analysis.py::test_report_json",),
    "uv run analysis.py | head -1": ("tests/test_analysis.py::test_a_closed_pipe_ends_quietly",),
    # program.md: measuring the last kept commit again after machine drift, on a detached HEAD and back
    "git checkout <kept>": ("tests/test_analysis.py::test_runs_on_a_detached_head_at_a_commit_of_the_branch_count",),
    "git checkout autoresearch/<tag>":
        ("tests/test_analysis.py::test_runs_on_a_detached_head_at_a_commit_of_the_branch_count",),
    "uv run analysis.py --verdict": ("tests/test_analysis.py::test_verdict_prints_one_word_then_the_numbers",
                                     "tests/test_docs.py::test_verdict_on_a_real_run"),
    "uv run benchmarks/bench_verdict.py": ("tests/test_docs.py::test_bench_verdict_runs",),
    # program.md: the run commands (timeout + trainer), each also run for real by a fixture without timeout
    "timeout 900 uv run train_mlx.py > run.log 2>&1": (TIMEOUT_TEST, "tests/conftest.py::mlx_run"),
    "timeout 900 uv run train.py > run.log 2>&1": (TIMEOUT_TEST, "tests/conftest.py::torch_run"),
    "AUTORESEARCH_BACKEND=mps timeout 900 uv run train.py > run.log 2>&1":
        (TIMEOUT_TEST, "tests/test_backends.py::test_requested_backend_that_works_is_returned", "tests/conftest.py::torch_run"),
    "AUTORESEARCH_BACKEND=cuda timeout 900 uv run train.py > run.log 2>&1":
        (TIMEOUT_TEST, "tests/test_backends.py::test_requested_backend_that_works_is_returned", "tests/conftest.py::torch_run"),
    "AUTORESEARCH_BACKEND=cpu timeout 7200 uv run train.py > run.log 2>&1": (TIMEOUT_TEST, "tests/conftest.py::torch_run"),
    "git add <file>": ("tests/test_docs.py::test_git_workflow_keeps_and_discards_commits",),
    'git commit -am "<description>"': ("tests/test_docs.py::test_git_workflow_keeps_and_discards_commits",),
    'grep "^val_bpb:\\|^peak_vram_mb:" run.log': ("tests/test_docs.py::test_grep_lines_read_the_summary",),
    'grep "^backend:" run.log': ("tests/test_docs.py::test_grep_lines_read_the_summary",
                                 "tests/test_docs.py::test_backend_grep_after_the_mlx_hand_over"),
    "tr '\\r' '\\n' < run.log | tail -n 60": ("tests/test_docs.py::test_the_end_of_the_log_without_the_progress_display",),
    "tail -n 1 runs.jsonl": ("tests/test_docs.py::test_the_last_run_record",),
    "git rev-parse --short=7 HEAD": ("tests/test_docs.py::test_git_workflow_keeps_and_discards_commits",),
    "git reset --hard <kept>": ("tests/test_docs.py::test_git_workflow_keeps_and_discards_commits",),
    # docs/fleet.md and program.md: the fleet
    "git init --bare /Volumes/shared/fleet.git": (FLEET_SETUP,),
    "git -C /Volumes/shared/fleet.git config receive.denyNonFastForwards true": (FLEET_SETUP,),
    "git -C /Volumes/shared/fleet.git config receive.denyDeletes true": (FLEET_SETUP,),
    "git remote add hub /Volumes/shared/fleet.git": (FLEET_SETUP,),
    "uv run hub.py board": (FLEET_SETUP, FLEET_NIGHT),
    "uv run hub.py publish": (FLEET_NIGHT,),
    'uv run hub.py claim "<idea>"': (FLEET_NIGHT,),
    'uv run hub.py release "<idea>"': (FLEET_NIGHT,),
    "uv run hub.py try <agent>/<tag>": (FLEET_NIGHT,),
    "uv run benchmarks/bench_hub.py": ("tests/test_hub.py::test_bench_hub_runs",),
}
COMMAND_WORDS = {"uv", "uvx", "git", "grep", "tail", "head", "cat", "ls", "python", "python3", "pip", "pip3", "curl",
                 "wget", "brew", "printf", "echo", "kill", "pkill", "export", "cd", "rm", "mkdir", "timeout", "sh", "bash",
                 "tr", "gtimeout"}
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*")
FENCE = re.compile(r"^[ \t]*```(\w*)[ \t]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)


def read(path):
    with open(path) as f:
        return f.read()


def fenced_blocks(text):
    """(language, dedented body) of every fenced code block, in order."""
    blocks = []
    for m in FENCE.finditer(text):
        lines = m.group(2).splitlines()
        indent = min((len(l) - len(l.lstrip()) for l in lines if l.strip()), default=0)
        blocks.append((m.group(1), "\n".join(l[indent:] for l in lines)))
    return blocks


def is_command(text):
    words = ENV_PREFIX.sub("", text).split()
    return bool(words) and words[0] in COMMAND_WORDS


def doc_commands(path):
    """Shell commands in a markdown file: every line of its bash blocks, and every inline code span that starts
    with a command word (so a command written in prose cannot escape the allow-list)."""
    text = read(path)
    commands = []
    for lang, body in fenced_blocks(text):
        if lang == "bash":
            commands += [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]
    prose = FENCE.sub("", text)
    for m in re.finditer(r"(`+)(.+?)\1", prose):
        span = m.group(2).strip()
        if is_command(span):
            commands.append(span)
    return list(dict.fromkeys(commands))


def section(text, heading):
    """The text under a `## heading`, up to the next heading of that level."""
    m = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert m, f"no section '## {heading}'"
    return m.group(1)


def test_every_fenced_block_says_whether_it_is_commands_or_output():
    for path in DOCS:
        for lang, body in fenced_blocks(read(path)):
            assert lang in ("bash", "text"), (path, lang, body[:80])


def test_the_docs_folder_is_read():
    assert {BACKENDS_DOC, TIERS_DOC, DATASETS_DOC, RUN_RECORD_DOC, FLEET_DOC} <= set(DOCS)


@pytest.mark.parametrize("path", DOCS, ids=lambda path: os.path.relpath(path, ROOT))
def test_every_command_in_the_docs_is_run_by_a_test_or_by_ci(path):
    for command in doc_commands(path):
        assert command in COMMANDS, f"{os.path.basename(path)}: {command!r} is not in COMMANDS: say what runs it"


def test_the_allow_list_names_real_tests_and_ci_lines_and_nothing_stale():
    documented = set().union(*(doc_commands(path) for path in DOCS))
    assert set(COMMANDS) == documented, set(COMMANDS) ^ documented
    ci_lines = [line.strip() for line in read(CI_RUN).splitlines()]
    for command, refs in COMMANDS.items():
        for ref in refs:
            if ref == NOT_RUN:
                assert command.startswith("curl -LsSf https://astral.sh/uv/install.sh"), command
            elif ref == ".ci/run":
                assert command in ci_lines, (command, "not a line of .ci/run")
            else:
                path, name = ref.split("::")
                assert re.search(rf"^def {name}\(", read(os.path.join(ROOT, path)), re.MULTILINE), ref

# ---------------------------------------------------------------------------
# Length, and references that stay inside the repository
# ---------------------------------------------------------------------------

def wc_words(path):
    """Words as `wc -w` counts them: runs of characters between ASCII whitespace."""
    with open(path, "rb") as f:
        return len(re.findall(rb"[^ \t\n\r\v\f]+", f.read()))


def test_wc_words_counts_as_wc_does(tmp_path):
    sample = tmp_path / "sample.md"
    sample.write_text("# A title\n\n| a | b |\n`uv run x`, and\tmore:\u00e9t\u00e9  --\n")
    assert wc_words(str(sample)) == 14
    if shutil.which("wc"):
        result = subprocess.run(["wc", "-w", str(sample)], capture_output=True, text=True, env={"LC_ALL": "C"})
        assert int(result.stdout.split()[0]) == 14


@pytest.mark.parametrize("path, limit", [(README, README_MAX_WORDS), (PROGRAM, PROGRAM_MAX_WORDS)],
                         ids=["README.md", "program.md"])
def test_readme_and_program_md_stay_short(path, limit):
    words = wc_words(path)
    assert words <= limit, f"{os.path.basename(path)}: {words} words, over {limit}: move detail into docs/"


def test_program_md_is_self_contained():
    """The agent reads program.md alone: it must not send the agent to another document for its rules."""
    program = read(PROGRAM)
    assert "README" not in program and "docs/" not in program
    assert not re.search(r"\]\((?!https?://)[^)]*\)", program), "program.md links to a file of the repository"


def markdown_files():
    """Every markdown file of the repository, outside hidden folders (.git, .venv) and caches."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("node_modules", "__pycache__")]
        found += [os.path.join(folder, name) for name in files if name.endswith(".md")]
    return sorted(found)


def test_markdown_files_are_the_docs():
    """Every document is under the checks above (the commands it shows, the words it uses)."""
    assert set(markdown_files()) == set(DOCS), set(markdown_files()) ^ set(DOCS)


# Paths of the machines this project was developed on, or of anyone's home folder: a user has none of them. The one
# home path a document may name is the cache's real default, and ~/corpus, the user's own text in an example.
OUTSIDE = re.compile(r"(?<![\w.])\.\./|(?<![\w.~])/(?:work|tmp|home|Users|root|mnt|scratch|shared)/|~/(?!\.cache/autoresearch\b|corpus\b)")


@pytest.mark.parametrize("path", DOCS, ids=lambda path: os.path.relpath(path, ROOT))
def test_no_document_points_outside_the_repository(path):
    for number, line in enumerate(read(path).splitlines(), 1):
        m = OUTSIDE.search(line)
        assert not m, f"{os.path.relpath(path, ROOT)}:{number}: {m.group(0)!r} names a path outside the repository"


def test_the_outside_pattern_catches_what_it_should():
    for bad in ("see ../shared/data/x", "[a](../README.md)", "in /work/main/.venv", "/tmp/run.log", "~/src/data",
                "/home/me/corpus", "`/Users/me`"):
        assert OUTSIDE.search(bad), bad
    for good in ("~/.cache/autoresearch/", "--source ~/corpus", "docs/backends.md", "/proc/meminfo", "2.5/4",
                 "https://github.com/karpathy/autoresearch"):
        assert not OUTSIDE.search(good), good


def heading_anchors(text):
    """GitHub's anchors for the headings of a markdown file (lowercase, punctuation dropped, spaces as hyphens)."""
    text = FENCE.sub("", text)
    return {re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def test_heading_anchors_are_githubs():
    assert heading_anchors("# PyTorch on CUDA: what a run costs\n## The `uv` way, step 2\n") == {
        "pytorch-on-cuda-what-a-run-costs", "the-uv-way-step-2"}


@pytest.mark.parametrize("path", DOCS, ids=lambda path: os.path.relpath(path, ROOT))
def test_every_relative_link_resolves_to_a_file_of_the_repository(path):
    text = FENCE.sub("", read(path))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"(https?|mailto):", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        assert os.path.commonpath([ROOT, linked]) == ROOT, (path, target, "outside the repository")
        assert os.path.isfile(linked), (os.path.relpath(path, ROOT), target, "no such file")
        if anchor:
            assert anchor in heading_anchors(read(linked)), (os.path.relpath(path, ROOT), target, "no such heading")

# ---------------------------------------------------------------------------
# README.md
# ---------------------------------------------------------------------------

def pytest_command(text):
    found = [line for line in text.splitlines() if line.strip().startswith("uv run pytest")]
    assert len(found) == 1, found
    return found[0].strip()


def test_readme_test_command_is_what_ci_runs():
    readme = read(README)
    command = pytest_command(fenced_blocks(section(readme, "Running the tests"))[0][1])
    assert pytest_command(read(CI_RUN)) == command
    # the two commands a newcomer needs open the README: the main job, then the tests
    first_two = [body.strip() for lang, body in fenced_blocks(readme)[:2]]
    assert first_two == ["uv run train.py", command]


@pytest.mark.slow
def test_install_commands_resolve_from_the_lockfile():
    uv = os.environ.get("UV") or shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH here: the README's install commands cannot be dry-run")
    installs = [c for c in doc_commands(README) if re.fullmatch(r"uv sync --extra \w+( --compile-bytecode)?", c)]
    assert {c.split()[3] for c in installs} == {"mlx", "torch", "all"}
    for command in installs:  # --dry-run: resolve and plan only; --locked: never rewrite uv.lock
        result = subprocess.run([uv, *command.split()[1:], "--locked", "--dry-run"], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stderr)


def summary_lines(text):
    """`key: value` lines as the backends summary prints them, as (key, value)."""
    return [tuple(part.strip() for part in line.split(":", 1)) for line in text.splitlines() if ":" in line]


@pytest.mark.slow
def test_python_m_backends_prints_the_fields_the_readme_shows():
    example = next(body for lang, body in fenced_blocks(read(BACKENDS_DOC)) if lang == "text")
    result = subprocess.run([sys.executable, "-m", "backends"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = dict(summary_lines(result.stdout))
    assert list(printed) == [key for key, _ in summary_lines(example)]
    hw = device.get_hardware_info()
    config = memory.suggest_hyperparameters(hw, *memory.trainer_architecture(hw["backend"]))
    assert printed["backend"] == device.detect_backend() and printed["tier"] == hw["tier"]
    assert [int(printed[k]) for k in config] == list(config.values())

    # the README's example is exactly what the code prints for that machine
    fields = dict(summary_lines(example))
    mac = {"backend": fields["backend"], "chip": fields["chip"], "generation": fields["generation"],
           "tier": fields["tier"], "gpu_cores": int(fields["gpu_cores"]), "memory_gb": float(fields["memory_gb"])}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_hardware_summary(mac)
    assert out.getvalue().strip() == example.strip()


def markdown_table(text, header_word):
    """Rows (lists of cells) of the first markdown table whose header row contains header_word."""
    lines = [line.strip() for line in text.splitlines()]  # a table may be indented under a list item
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and header_word in line)
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[0], [row for row in rows[2:]]  # skip the |---| row


def test_tier_table_is_what_suggest_hyperparameters_returns():
    header, rows = markdown_table(read(TIERS_DOC), "DEVICE_BATCH_SIZE")
    assert header == ["tier", "chips", "backend", "memory (GB)", "DEPTH", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE",
                      "estimate (GB)"]
    as_int = lambda cell: 2 ** int(cell[3:]) if cell.startswith("2**") else int(cell)
    seen = set()
    for tier, _, backend_cell, memory_cell, depth, batch, total, estimate in rows:
        memories = [8.0, 64.0, 512.0] if memory_cell == "any" else [float(m) for m in memory_cell.split(",")]
        for backend in backend_cell.split(", "):
            for memory_gb in memories:
                hw = {"tier": tier, "memory_gb": memory_gb, "backend": backend}
                architecture = memory.trainer_architecture(backend)
                config = memory.suggest_hyperparameters(hw, *architecture)
                row = (tier, backend, memory_gb)
                assert config == {"depth": int(depth), "device_batch_size": int(batch),
                                  "total_batch_size": as_int(total)}, row
                estimated = memory.estimate_memory_gb(int(depth), int(batch), *architecture, backend=backend, hw=hw)
                assert f"{estimated:.1f}" == estimate, row
        seen.add(tier)
    assert seen == set(memory.TIER_DEFAULTS)
    # what the prose around the table says
    assert memory.TIER_DEFAULTS["cuda"] == (8, 128, 2**19)  # the original's configuration
    assert memory.memory_fraction({"tier": "max"}) == 0.5 and memory.memory_fraction({"tier": "cuda"}) == 0.85


def test_prepare_help_lists_every_option_the_readme_names():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--help"], cwd=ROOT, text=True,
                            capture_output=True, env={**os.environ, "COLUMNS": "1000"}, timeout=120)
    assert result.returncode == 0, result.stderr
    data = read(DATASETS_DOC)
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", data))
    assert {"--source", "--num-shards"} <= options
    for option in options:
        assert option in result.stdout, option
    for fact in (".parquet", "`text`", ".jsonl", ".txt", "blank lines", "<|endoftext|>", "shard_06542.parquet",
                 "val/valid/validation", "EVAL_TOKENS", "a fifth", "-1 = all"):
        assert fact in result.stdout, fact  # docs/datasets.md describes --source's formats as --help does


def test_environment_variables_in_the_docs_exist_in_the_code():
    code = "".join(read(os.path.join(ROOT, f)) for f in ("prepare.py", "backends/device.py", "hub.py"))
    for path in DOCS:
        for name in set(re.findall(r"\b(?:AUTORESEARCH_[A-Z_]+|HF_ENDPOINT)\b", read(path))):
            assert f'"{name}"' in code, (os.path.basename(path), name)

# ---------------------------------------------------------------------------
# program.md against a real run (the torch_run fixture: train.py on the CPU, output redirected to run.log)
# ---------------------------------------------------------------------------

def printed_summary(log):
    """(key, value) of the summary block after the last `---`: its lines align values at column 18 (anything after
    it, such as a library's exit-time message, is not part of it)."""
    block = ("\n" + log).split("\n---\n")[-1].splitlines()
    pairs = []
    for line in block:
        m = re.match(r"([A-Za-z_]+): +", line)
        if not m or m.end() != 18:
            break
        pairs.append((m.group(1), line[18:]))
    return pairs


def example_summary():
    """The summary block program.md shows the agent, as (key, value)."""
    body = next(body for lang, body in fenced_blocks(read(PROGRAM)) if body.startswith("---\n"))
    return printed_summary(body)


def agent_commands(prefix):
    found = [c for c in doc_commands(PROGRAM) if c.startswith(prefix)]
    assert found, f"program.md gives no command starting with {prefix!r}"
    return found


def bash(command, cwd):
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_example_summary_has_the_keys_a_real_run_prints(torch_run):
    returncode, _, log = torch_run
    assert returncode == 0, log[-3000:]
    real = [key for key, _ in printed_summary(log)]
    warnings = real.index("warning")  # the fixture uses the smoke-test knobs; a real run need not warn at all
    assert set(real[warnings:]) == {"warning"}
    example = example_summary()
    assert [key for key, _ in example] == real[:warnings]
    # docs/run-record.md's explanation of the output covers the same keys, warning included (once: it may repeat)
    _, rows = markdown_table(section(read(RUN_RECORD_DOC), "The summary"), "meaning")
    assert [row[0].strip("`") for row in rows] == ["---"] + real[:warnings + 1]


def test_results_example_matches_the_summary_example():
    blocks = [body for lang, body in fenced_blocks(section(read(PROGRAM), "Logging results")) if body.startswith("commit\t")]
    header, example = blocks[0].strip(), blocks[1].strip().splitlines()
    baseline_block = next(body for lang, body in fenced_blocks(read(PROGRAM)) if body.startswith("commit\t"))
    assert baseline_block.strip().splitlines() == example[:4]  # the baseline section shows the same three runs
    assert example[0] == header == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    for row in example[1:]:
        commit, val_bpb, memory_gb, status, description = row.split("\t")
        assert re.fullmatch(r"[0-9a-f]{7}", commit) and status in ("keep", "discard", "crash", "rerun") and description
        assert re.fullmatch(r"\d\.\d{6}", val_bpb) and re.fullmatch(r"\d+\.\d", memory_gb)
    summary = dict(example_summary())
    baseline = example[1].split("\t")
    assert baseline[1] == summary["val_bpb"]
    assert baseline[2] == f"{float(summary['peak_vram_mb']) / 1024:.1f}"  # memory_gb = peak_vram_mb / 1024, .1f


def test_grep_lines_read_the_summary(torch_run):
    returncode, log_path, log = torch_run
    assert returncode == 0, log[-3000:]
    folder = os.path.dirname(log_path)
    lines = log.split("\n")  # grep's lines: the progress display's \r does not end one
    for command in agent_commands('grep "^val_bpb:'):
        result = bash(command, folder)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [l for l in lines if l.startswith(("val_bpb:", "peak_vram_mb:"))]
        val_bpb, peak = result.stdout.splitlines()
        assert float(val_bpb.split()[1]) > 0 and float(peak.split()[1]) > 0
    (command,) = agent_commands('grep "^backend:')
    result = bash(command, folder)
    first, last = result.stdout.splitlines()  # the log's first line and the summary's, the same key in both
    assert first.startswith("backend: cpu | chip: ") and last == "backend:          cpu"


def test_backend_grep_after_the_mlx_hand_over(mlx_run):
    """`uv run train.py` handed over to train_mlx.py: the grep shows the hand-over note, train_mlx.py's first line
    and the summary line."""
    returncode, log_path, log = mlx_run
    assert returncode == 0, log[-3000:]
    (command,) = agent_commands('grep "^backend:')
    lines = bash(command, os.path.dirname(log_path)).stdout.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("backend: mlx -> handing over to train_mlx.py")
    assert lines[1].startswith("backend: mlx (")
    assert lines[2] == "backend:          mlx"


def test_the_end_of_the_log_without_the_progress_display(torch_run):
    """The crash-reading command: the progress display's in-place updates become lines of their own, so the end of
    the log is the last updates and whatever followed them, never one line of thousands of characters."""
    _, log_path, log = torch_run
    (command,) = agent_commands("tr ")
    result = bash(command, os.path.dirname(log_path))
    assert result.returncode == 0
    converted = log.replace("\r", "\n")
    lines = converted.removesuffix("\n").split("\n")  # the last line may lack its \n (a library's exit message)
    assert result.stdout == "\n".join(lines[-60:]) + ("\n" if converted.endswith("\n") else "")
    assert max(map(len, result.stdout.splitlines())) < 300


def test_the_last_run_record(torch_run):
    _, log_path, _ = torch_run
    (command,) = agent_commands("tail ")
    result = bash(command, os.path.dirname(log_path))
    record = json.loads(result.stdout)
    assert record["status"] == "ok" and record["trainer"] == "train.py"


def test_verdict_on_a_real_run(torch_run):
    """`uv run analysis.py --verdict` where the trainer ran: its first run is the baseline's first of three, or, from a
    checkout with uncommitted changes, an error that says to commit first."""
    _, log_path, _ = torch_run
    folder = os.path.dirname(log_path)
    with open(os.path.join(folder, "results.tsv"), "w") as f:
        f.write("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")
    with open(os.path.join(folder, "runs.jsonl")) as f:
        (record,) = map(json.loads, f)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "analysis.py"), "--verdict"], cwd=folder,
                            capture_output=True, text=True, timeout=120)
    if record["dirty"]:
        assert result.returncode == 1 and "uncommitted changes" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        # the baseline's first run, or (on a machine whose speed changed during the run) a rerun that says so
        assert result.stdout.splitlines()[0] == "rerun" and ("baseline run 1 of 3" in result.stdout
                                                            or "the machine's speed changed" in result.stdout)


STUB_TRAINER = """
import sys, time
sys.path.insert(0, {root!r})
from backends.record import start_run
run = start_run(__file__, "cpu", {{"chip": "stub"}})
print("started", flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_timeout_stops_a_run_and_leaves_a_crash_record(tmp_path):
    """program.md's run commands, with a trainer that hangs: `timeout` stops it (through `uv run`, which passes the
    signal on, where uv is installed), the log says so, and runs.jsonl records a crash."""
    commands = [c for c in doc_commands(PROGRAM) if "timeout " in c]
    pattern = r"(AUTORESEARCH_BACKEND=(mps|cuda|cpu) )?timeout (900|7200) uv run (train|train_mlx)\.py > run\.log 2>&1"
    assert len(commands) == 5 and all(re.fullmatch(pattern, c) for c in commands), commands
    uv = os.environ.get("UV") or shutil.which("uv")
    # uv with the tests' own Python, not the checkout's .venv: that may not exist (the suite run by a Python that
    # already holds PyTorch), and `uv run --project` would create an empty one in the repository
    runner = f"{uv} run --no-project --python {sys.executable}" if uv else sys.executable
    for script in sorted({c.split()[-4] for c in commands}):  # train.py, train_mlx.py
        (tmp_path / script).write_text(STUB_TRAINER.format(root=ROOT))
        command = ENV_PREFIX.sub("", next(c for c in commands if c.split()[-4] == script)).replace("uv run", runner)
        for limit in (8, 16, 32, 48):  # a loaded machine may take longer than 8 s to import the stub's modules
            result = bash(re.sub(r"timeout \d+", f"timeout {limit}", command), str(tmp_path))
            assert result.returncode == 124, (command, result.stderr)
            # uv's own warnings (a deprecated setting in the user's environment) may come first: not the trainer's
            log = [line for line in (tmp_path / "run.log").read_text().splitlines() if not line.startswith("warning: ")]
            if log:
                break
        assert log[0] == "started" and re.fullmatch(r"terminated by SIGTERM after \d+ s", log[-1]), log
        *_, record = map(json.loads, (tmp_path / "runs.jsonl").read_text().splitlines())
        assert record["trainer"] == script and record["status"] == "crash" and "SIGTERM" in record["error"]


def test_bench_verdict_runs():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_verdict.py"), "200"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # two header lines, one line per true gain; then the drift tables: a blank line and their header, and for each of
    # two machines and two patterns a blank line, a title, a header and one line per true gain
    assert len(result.stdout.splitlines()) == 2 + 6 + 2 + 2 * 2 * (3 + 6)


def test_program_md_works_on_every_backend():
    """The agent on an NVIDIA machine or a CPU finds its row (file and command), and the cache where it really is."""
    program = read(PROGRAM)
    header, rows = markdown_table(section(program, "Setup"), "the run command")
    assert header == ["backend", "when", "the file you edit", "the run command"]
    assert {row[0].lower() for row in rows} == set(device.BACKENDS) - {"auto"}
    for name, _, trainer, command in rows:
        trainer, command = trainer.strip("`"), command.strip("`")
        assert command.split(" > ")[0].endswith(f"uv run {trainer}") and trainer == (
            "train_mlx.py" if name == "MLX" else "train.py"), (name, command)
        if name in ("CUDA", "CPU"):  # named outright: a missing GPU is an error, not a silent CPU run
            assert command.startswith(f"AUTORESEARCH_BACKEND={name.lower()} "), command
    data_step = next(line for line in program.splitlines() if "**Check the data**" in line)
    assert "AUTORESEARCH_CACHE_DIR" in data_step and "~/.cache/autoresearch/" in data_step
    assert "this Mac" not in program  # the machine may be an NVIDIA box or a CPU


def test_run_log_ends_with_the_summary(torch_run):
    """Nothing after the summary (no library's exit-time messages): a crash's traceback is what `tail` shows."""
    returncode, _, log = torch_run
    assert returncode == 0, log[-3000:]
    last_key, _ = printed_summary(log)[-1]
    assert log.rstrip("\n").split("\n")[-1].startswith(f"{last_key}:"), log[-3000:]


def test_git_workflow_keeps_and_discards_commits(tmp_path):
    """The setup and loop commands of program.md, in a scratch repository with this project's .gitignore."""
    names = {"tag": "docs-test", "description": "try a smaller batch", "file": "helper.py"}
    fill = lambda command: re.sub(r"<(\w+)>", lambda m: names[m.group(1)], command)
    (checkout,) = agent_commands("git checkout -b")
    (header,) = agent_commands("printf ")
    (add,) = agent_commands("git add")
    (commit,) = agent_commands("git commit")
    (short_hash,) = agent_commands("git rev-parse")
    (reset,) = agent_commands("git reset")
    repo = str(tmp_path)
    env = {**os.environ, "HOME": repo, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "agent",
           "GIT_AUTHOR_EMAIL": "agent@example.com", "GIT_COMMITTER_NAME": "agent",
           "GIT_COMMITTER_EMAIL": "agent@example.com"}
    git = lambda *args: subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout.strip()
    run = lambda command: subprocess.run(["bash", "-c", fill(command)], cwd=repo, env=env, capture_output=True,
                                         text=True, timeout=60)
    shutil.copy(os.path.join(ROOT, ".gitignore"), repo)
    (tmp_path / "train_mlx.py").write_text("DEPTH = 8\n")
    git("init", "-q", "-b", "main")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    start = git("rev-parse", "HEAD")
    names["kept"] = start[:7]  # the verdict's `next:` line names the last kept commit

    assert run(checkout).returncode == 0
    assert git("branch", "--show-current") == "autoresearch/docs-test"
    assert run(header).returncode == 0
    assert (tmp_path / "results.tsv").read_text() == "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"

    (tmp_path / "train_mlx.py").write_text("from helper import DEPTH\n")  # the experiment, with a new file
    (tmp_path / "helper.py").write_text("DEPTH = 6\n")
    assert run(add).returncode == 0
    assert run(commit).returncode == 0
    assert "helper.py" in git("ls-files") and git("status", "--porcelain") == ""
    experiment = git("rev-parse", "HEAD")
    assert experiment != start and git("log", "-1", "--format=%s") == names["description"]
    result = run(short_hash)
    assert result.stdout.strip() == experiment[:7]

    outputs = ("run.log", "runs.jsonl", "progress.png")
    for name in outputs:
        (tmp_path / name).write_text("a run's output\n")
    assert git("status", "--porcelain") == ""  # the run's outputs do not make the tree dirty
    assert run(reset).returncode == 0  # discard: back to the last kept commit
    assert git("rev-parse", "HEAD") == start and (tmp_path / "train_mlx.py").read_text() == "DEPTH = 8\n"
    assert not (tmp_path / "helper.py").exists()
    # results.tsv and the run's outputs survive the reset and are never committed: .gitignore keeps them out
    assert all((tmp_path / name).exists() for name in ("results.tsv",) + outputs)
    assert git("status", "--porcelain") == ""
    committed = git("log", "--all", "--name-only", "--format=")
    assert not any(name in committed for name in ("results.tsv",) + outputs)
