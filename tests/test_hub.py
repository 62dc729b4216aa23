"""hub.py: a fleet of agents sharing one git remote named `hub`. Everything runs offline on bare repositories in
tmp_path with one clone per agent, hub.py as the agent runs it (a separate process), run records written by the
real record code (backends/record.py) and verdicts by analysis.py itself. The rule under test is hub.py's
docstring: append-only files, pushes never forced, the board compared within one setup."""
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import hub
import prepare
from backends import device, record
from conftest import ROOT, python_env
from test_docs import FLEET_DOC, PROGRAM, doc_commands, fenced_blocks, read, section

HUB_PY = os.path.join(ROOT, "hub.py")
ANALYSIS = os.path.join(ROOT, "analysis.py")
TRAINER = "DEPTH = 2\nMATRIX_LR = 0.04\nWINDOW = 1024\n"  # the night's starting train.py in every clone
VALUES = dict(training_seconds=2.0, total_seconds=9.0, peak_vram_mb=300.0, mfu_percent=1.0, total_tokens_M=0.05,
              num_steps=20, num_params_M=3.5, depth=2, eval_seconds=1.0)


@pytest.fixture
def recording(monkeypatch):
    """The record code as a trainer uses it, without a prepared cache or a framework: fixed data fingerprint and
    machine speed, no swap readings, no smoke knobs."""
    monkeypatch.setattr(prepare, "data_fingerprint", lambda: "da7a0001")
    monkeypatch.setattr(prepare, "DATASET", "climbmix")
    monkeypatch.setattr(prepare, "SMOKE_KNOBS", [])
    monkeypatch.setattr(prepare, "SMOKE_TEST_WARNING", None)
    monkeypatch.setattr(prepare, "evaluation_rows", lambda: (2, 2))
    monkeypatch.setattr(device, "swap_used_mb", lambda: None)
    monkeypatch.setattr(record, "machine_speed", lambda backend: 100.0)
    return monkeypatch


def git_env(home):
    return python_env(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="agent",
                      GIT_AUTHOR_EMAIL="agent@example.com", GIT_COMMITTER_NAME="agent",
                      GIT_COMMITTER_EMAIL="agent@example.com")


def bare_hub(path):
    """A hub as docs/fleet.md sets one up: a bare repository that refuses forced pushes and deletions."""
    subprocess.run(["git", "init", "-q", "--bare", str(path)], check=True)
    for key in ("receive.denyNonFastForwards", "receive.denyDeletes"):
        subprocess.run(["git", "-C", str(path), "config", key, "true"], check=True)
    return path


class Agent:
    """One agent's clone: its night's branch autoresearch/night, train.py, results.tsv, and a remote `hub`."""

    def __init__(self, root, name, hub_path, monkeypatch, chip="Test CPU A"):
        self.name, self.chip, self.monkeypatch = name, chip, monkeypatch
        self.dir = root / name
        self.dir.mkdir()
        self.env = {**git_env(root), "AUTORESEARCH_AGENT": name}
        shutil.copy(os.path.join(ROOT, ".gitignore"), self.dir)
        (self.dir / "train.py").write_text(TRAINER)
        self.git("init", "-q", "-b", "autoresearch/night")
        self.git("add", ".")
        self.git("commit", "-q", "-m", "baseline")
        if hub_path is not None:
            self.git("remote", "add", "hub", f"file://{hub_path}")
        (self.dir / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n")

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.dir, env=self.env, check=True, capture_output=True,
                              text=True).stdout.strip()

    def hub(self, *args, **env):
        return subprocess.run([sys.executable, HUB_PY, *args], cwd=self.dir, env={**self.env, **env},
                              capture_output=True, text=True, timeout=120)

    def start(self, *args):
        return subprocess.Popen([sys.executable, HUB_PY, *args], cwd=self.dir, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def run(self, val_bpb):
        """One run of HEAD, recorded in runs.jsonl by the real record code, as a trainer in this folder would."""
        self.monkeypatch.chdir(self.dir)
        run = record.Run(str(self.dir / "train.py"), "cpu", {"chip": self.chip})
        run.mark_training_start()
        run.summary(val_bpb=val_bpb, **VALUES)

    def step(self, val_bpb, description, word=None):
        """program.md's loop after a run: the verdict (analysis.py --verdict, unless word is given), then the row
        in results.tsv."""
        self.run(val_bpb)
        out = word
        if word is None:
            result = subprocess.run([sys.executable, ANALYSIS, "--verdict"], cwd=self.dir, env=self.env,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            word, out = result.stdout.split("\n", 1)[0], result.stdout
        with open(self.dir / "results.tsv", "a") as f:
            f.write(f"{self.head()}\t{val_bpb:.6f}\t0.3\t{word}\t{description}\n")
        return word, out

    def head(self):
        return self.git("rev-parse", "--short=7", "HEAD")

    def baseline(self, values=(1.0, 1.01, 0.99)):
        return [self.step(v, "baseline")[0] for v in values]

    def idea(self, description, line, values):
        """Commit an edit of train.py, run it until the verdict decides, reset on discard: the final word."""
        with open(self.dir / "train.py", "a") as f:
            f.write(line + "\n")
        self.git("commit", "-q", "-am", description)
        for value in values:
            word, out = self.step(value, description)
            if word != "rerun":
                break
        if word == "discard":
            self.git("reset", "-q", "--hard", re.search(r"git reset --hard (\w+)", out).group(1))
        return word


@pytest.fixture
def fleet(tmp_path, recording):
    """A bare hub and a factory of agents' clones."""
    path = bare_hub(tmp_path / "hub.git")

    def agent(name, **kwargs):
        return Agent(tmp_path, name, path, recording, **kwargs)
    agent.hub = path
    return agent


def hub_git(path, *args):
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True).stdout


def hub_files(path, branch="results/*"):
    """The files of the hub's branches that match branch (every agent's results by default)."""
    refs = hub_git(path, "for-each-ref", "--format=%(refname)", f"refs/heads/{branch}").split()
    return sorted(f for ref in refs for f in hub_git(path, "ls-tree", "-r", "--name-only", ref).split())


def one_line_error(result, text):
    """A user's mistake: exit status 1, one line on stderr that says it, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr, result.stderr
    assert text in result.stderr, result.stderr

# ---------------------------------------------------------------------------
# publish and board
# ---------------------------------------------------------------------------

def test_publish_sends_the_nights_runs_and_kept_branch_once_and_the_board_shows_them(fleet):
    alpha = fleet("alpha")
    assert alpha.baseline() == ["rerun", "rerun", "keep"]
    assert alpha.idea("twice the steps", "TOTAL = 2**15", [0.90]) == "keep"
    kept = alpha.git("rev-parse", "HEAD")
    assert alpha.idea("a higher LR", "MATRIX_LR = 0.08", [1.03]) == "discard"
    alpha.run(0.95)  # a run not logged yet: it waits for its row

    branches = alpha.git("show-ref", "--heads")
    result = alpha.hub("publish")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "published 5 run(s) of night as alpha (0 already on the hub)",
        f"agents/alpha/night at the last kept commit {kept[:7]}",
        "1 run(s) of this night wait for their row in results.tsv: the next publish sends them"]
    ids = [json.loads(line)["id"] for line in (alpha.dir / "runs.jsonl").read_text().splitlines()]
    assert hub_files(fleet.hub) == sorted(f"runs/alpha/{i}.json" for i in ids[:5])
    assert hub_git(fleet.hub, "rev-parse", "agents/alpha/night").strip() == kept  # the discarded commit is not there
    entry = json.loads(hub_git(fleet.hub, "show", f"results/alpha:runs/alpha/{ids[3]}.json"))
    assert entry["record"] == {**json.loads((alpha.dir / "runs.jsonl").read_text().splitlines()[3])}
    assert entry["row"] == {"commit": kept[:7], "val_bpb": 0.9, "memory_gb": 0.3, "status": "keep",
                            "description": "twice the steps", "line": 5}  # line: the order of the night
    assert entry["verdict"]["word"] == "keep" and entry["verdict"]["run"] == ids[3] and entry["tried"] is None
    assert alpha.git("status", "--porcelain") == "" and alpha.git("show-ref", "--heads") == branches  # untouched

    results_tip = hub_git(fleet.hub, "rev-parse", "results/alpha")
    again = alpha.hub("publish")
    assert again.returncode == 0 and again.stdout.splitlines()[0] == (
        "nothing new to publish: the hub has all 5 run(s) of night from alpha")
    assert hub_git(fleet.hub, "rev-parse", "results/alpha") == results_tip  # idempotent: no new commit

    board = alpha.hub("board")
    assert board.returncode == 0, board.stderr
    text = board.stdout
    assert "fleet at file://" in text and "1 agent(s) (alpha), 5 runs of 3 commits" in text
    assert f"setup 1: harness {record.harness_fingerprint()}, dataset climbmix, data da7a0001, cpu on Test CPU A" in text
    assert "  baseline 1.000000 (3 runs), sigma 0.010000 (dof 2)" in text
    best = next(line for line in text.splitlines() if line.endswith("twice the steps"))
    assert best.split()[:4] == ["0.900000", "0.100000", "+10.0", "alpha/night"]
    recent = text.split("RECENT IDEAS")[1].split("OPEN CLAIMS")[0].splitlines()[1:]
    assert [line.split()[1] for line in recent if line.strip()] == ["discard", "keep"]  # newest first, no baseline
    as_json = json.loads(alpha.hub("board", "--json").stdout)
    (setup,) = as_json["setups"]
    assert setup["key"]["chip"] == "Test CPU A" and setup["sigma"] == pytest.approx(0.01)
    (top,) = setup["best"]
    assert (top["commit"], top["gain"], top["sigmas"], top["confirmed"]) == (kept[:7], pytest.approx(0.1),
                                                                              pytest.approx(10.0), False)
    assert as_json["claims"] == [] and as_json["confirmed"] == []


def test_without_a_hub_remote_publish_lets_the_loop_go_on_and_the_rest_say_what_is_missing(tmp_path, recording):
    alone = Agent(tmp_path, "alone", None, recording)
    alone.baseline()
    result = alone.hub("publish")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == ("no hub remote: nothing published (the local loop goes on; `git remote add hub <url>` "
                             "joins a fleet)\n")
    one_line_error(alone.hub("board"), "error: no hub remote: no fleet to show (join a fleet with `git remote add "
                                       "hub <url>`)")
    one_line_error(alone.hub("claim", "x"), "no hub remote")
    one_line_error(alone.hub("publish", AUTORESEARCH_AGENT="Bad Name"), "AUTORESEARCH_AGENT='Bad Name': use 1 to 40")
    outside = subprocess.run([sys.executable, HUB_PY, "board"], cwd=tmp_path, env=alone.env, capture_output=True,
                             text=True)
    one_line_error(outside, "error: not a git repository")
    alone.git("checkout", "-q", "--detach")
    one_line_error(alone.hub("publish"), "HEAD is detached")


def test_the_default_agent_name_is_the_host_and_the_backend_of_the_latest_run(tmp_path, recording, monkeypatch):
    agent = Agent(tmp_path, "somebody", None, recording, chip="x")
    agent.run(1.0)
    monkeypatch.delenv("AUTORESEARCH_AGENT", raising=False)
    monkeypatch.setattr(hub.socket, "gethostname", lambda: "Johns-MacBook-Pro.local")
    assert hub.agent_name() == "johns-macbook-pro-cpu"
    assert hub.AGENT.fullmatch(hub.agent_name())

# ---------------------------------------------------------------------------
# Many agents at once, and a hub that goes away
# ---------------------------------------------------------------------------

def test_ten_agents_publishing_at_once_all_land(fleet):
    agents = [fleet(f"agent-{i}", chip=f"Test CPU {i % 3}") for i in range(10)]
    for agent in agents:
        agent.step(1.0, "baseline", "rerun")
        agent.step(1.01, "baseline", "rerun")
    started = time.perf_counter()
    procs = [agent.start("publish") for agent in agents]  # ten processes racing for the results branch
    outs = [proc.communicate(timeout=300) for proc in procs]
    print(f"10 concurrent publishes: {time.perf_counter() - started:.1f} s")
    assert [proc.returncode for proc in procs] == [0] * 10, outs
    assert all(re.match(r"published 2 run\(s\) of night as agent-\d \(0 already on the hub(; \d+ push\(es\) rejected "
                        r"while other agents landed first)?\)\n", out) for out, _ in outs), outs
    assert len(hub_files(fleet.hub)) == 20
    assert {path.split("/")[1] for path in hub_files(fleet.hub)} == {a.name for a in agents}
    for agent in agents:  # one commit each, on a branch of its own that nobody else writes
        assert hub_git(fleet.hub, "rev-list", "--count", f"results/{agent.name}").strip() == "1"


def test_a_hub_that_disappears_mid_night_then_returns_gets_everything_missing(fleet):
    alpha = fleet("alpha")
    alpha.baseline()
    assert alpha.hub("publish").returncode == 0
    away = fleet.hub.with_name("away.git")
    fleet.hub.rename(away)  # the NAS went to sleep
    alpha.idea("twice the steps", "TOTAL = 2**15", [0.90])
    gone = alpha.hub("publish")
    assert gone.returncode == 0 and gone.stdout.startswith("hub unreachable (fatal: ") and gone.stdout.endswith(
        "nothing published; the local loop goes on, and the next publish sends all that is missing\n"), gone.stdout
    one_line_error(alpha.hub("board"), "error: hub unreachable: fatal: ")
    alpha.idea("a higher LR", "MATRIX_LR = 0.08", [1.03])
    away.rename(fleet.hub)
    back = alpha.hub("publish")
    assert back.stdout.startswith("published 2 run(s) of night as alpha (3 already on the hub)"), back.stdout
    assert len(hub_files(fleet.hub)) == 5

# ---------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------

def test_of_two_agents_claiming_one_idea_at_once_the_second_is_refused(fleet):
    alpha, beta = fleet("alpha"), fleet("beta")
    procs = {a.name: a.start("claim", "Muon for the embeddings") for a in (alpha, beta)}
    outs = {name: proc.communicate(timeout=120) for name, proc in procs.items()}
    codes = {name: proc.returncode for name, proc in procs.items()}
    assert sorted(codes.values()) == [0, 1], outs
    winner = next(name for name, code in codes.items() if code == 0)
    loser = alpha if winner == "beta" else beta
    assert outs[winner][0] == f"claimed 'Muon for the embeddings' as {winner} for 4 hours\n"
    assert re.fullmatch(rf"error: refused: 'Muon for the embeddings' is claimed by {winner} until \S+: choose "
                        rf"another idea\n", outs[loser.name][1]), outs[loser.name]
    # the idea's words, not its spelling: the same slug is the same idea
    one_line_error(loser.hub("claim", "muon FOR the embeddings!"), f"is claimed by {winner}")
    board = json.loads(loser.hub("board", "--json").stdout)
    assert [(c["idea"], c["agent"]) for c in board["claims"]] == [("Muon for the embeddings", winner)]
    one_line_error(loser.hub("release", "Muon for the embeddings"), f"no open claim of yours on 'Muon for the "
                                                                   f"embeddings' (it is {winner}'s)")
    winner_agent = alpha if winner == "alpha" else beta
    assert winner_agent.hub("claim", "Muon for the embeddings").stdout.startswith("'Muon for the embeddings' is "
                                                                                  "already yours until ")
    assert winner_agent.hub("release", "Muon for the embeddings").stdout == "released 'Muon for the embeddings'\n"
    assert loser.hub("claim", "Muon for the embeddings").returncode == 0  # free again
    assert len(hub_files(fleet.hub, "claims")) == 3  # claim, release, claim: nothing removed


def test_a_claim_ends_by_itself_after_its_hours():
    at = datetime.datetime(2025, 11, 25, 23, 0, tzinfo=datetime.timezone.utc)
    event = lambda kind, agent, hours: {"event": kind, "slug": "idea", "agent": agent, "idea": "idea",
                                        "at": at + datetime.timedelta(hours=hours),
                                        "until_at": at + datetime.timedelta(hours=hours + hub.CLAIM_HOURS)}
    events = [event("claim", "alpha", 0), event("claim", "beta", 1)]  # beta's came while alpha held it: ignored
    assert hub.open_claims(events, at + datetime.timedelta(hours=2))["idea"]["agent"] == "alpha"
    assert hub.open_claims(events, at + datetime.timedelta(hours=hub.CLAIM_HOURS)) == {}  # ran out
    events.append(event("claim", "beta", hub.CLAIM_HOURS + 1))  # after it ran out, anyone may claim it
    assert hub.open_claims(events, at + datetime.timedelta(hours=hub.CLAIM_HOURS + 2))["idea"]["agent"] == "beta"
    events.append(event("release", "alpha", hub.CLAIM_HOURS + 2))  # only the holder's release counts
    assert hub.open_claims(events, at + datetime.timedelta(hours=hub.CLAIM_HOURS + 3))["idea"]["agent"] == "beta"

# ---------------------------------------------------------------------------
# try, and a gain confirmed on a second setup
# ---------------------------------------------------------------------------

def test_try_brings_a_kept_change_and_keeping_it_on_another_setup_confirms_it(fleet):
    alpha, beta = fleet("alpha", chip="Test CPU A"), fleet("beta", chip="Test CPU B")
    alpha.baseline()
    alpha.idea("twice the steps", "TOTAL = 2**15", [0.90])
    alpha.idea("a higher LR", "MATRIX_LR = 0.08", [1.03])
    original = alpha.git("log", "-1", "--format=%H", "HEAD")
    assert alpha.hub("publish").returncode == 0
    beta.baseline((1.1, 1.11, 1.09))  # another chip: another scale
    beta.idea("a smaller window", "WINDOW = 512", [1.2])  # discarded: beta is back at its baseline

    tried = beta.hub("try", "alpha/night")
    assert tried.returncode == 0, tried.stderr
    assert tried.stdout.startswith(f"HEAD {beta.head()}: alpha/night {original[:7]}'s change (train.py) as one "
                                   f"commit on autoresearch/night")
    assert beta.git("log", "-1", "--format=%B") == (f"try alpha/night {original[:7]}: twice the steps\n\n"
                                                    f"Tried-from: alpha/night {original}")
    assert (beta.dir / "train.py").read_text() == TRAINER + "TOTAL = 2**15\n"
    assert beta.step(1.0, "try alpha/night: twice the steps")[0] == "keep"
    assert beta.hub("publish").returncode == 0

    board = json.loads(beta.hub("board", "--json").stdout)
    (confirmed,) = board["confirmed"]
    assert (confirmed["original"]["agent"], confirmed["original"]["commit"]) == ("alpha", original[:7])
    assert (confirmed["by"]["agent"], confirmed["by"]["commit"], confirmed["by"]["gain"]) == (
        "beta", beta.head(), pytest.approx(0.1))
    assert confirmed["original"]["setup"] != confirmed["by"]["setup"]
    top = {s["key"]["chip"]: s["best"][0] for s in board["setups"]}
    assert top["Test CPU A"]["confirmed"] is True and top["Test CPU B"]["confirmed"] is False
    text = beta.hub("board").stdout
    assert "twice the steps  [CONFIRMED]" in text
    assert f"alpha/night {original[:7]} 'twice the steps' (setup" in text.split("CONFIRMED: gains")[1]


def test_try_refuses_what_it_cannot_apply_cleanly(fleet):
    alpha, beta = fleet("alpha"), fleet("beta")
    alpha.baseline()
    with open(alpha.dir / "prepare.py", "w") as f:  # a kept commit that edits a fixed file
        f.write("EVAL_TOKENS = 1\n")
    alpha.git("add", "prepare.py")
    alpha.idea("a smaller evaluation", "X = 1", [0.5])
    assert alpha.hub("publish").returncode == 0
    one_line_error(beta.hub("try", "alpha/night"), "changes fixed files (prepare.py)")
    one_line_error(beta.hub("try", "alpha/other"), "no agents/alpha/other on the hub")
    one_line_error(beta.hub("try", "../x"), "name another agent's night as <agent>/<tag>")
    (beta.dir / "train.py").write_text("edited\n")
    one_line_error(beta.hub("try", "alpha/night"), "uncommitted changes")
    assert beta.git("log", "--format=%s") == "baseline"

# ---------------------------------------------------------------------------
# What another agent wrote: bad files, and attempts to overwrite
# ---------------------------------------------------------------------------

def push_raw(agent, files, branch, force=False):
    """What a broken or hostile client could push: a commit on top of the hub's branch (or, forced, in its place)
    that adds the given files."""
    env = {**agent.env, "GIT_INDEX_FILE": str(agent.dir / ".git" / "raw.index")}
    run = lambda *args, **kw: subprocess.run(["git", *args], cwd=agent.dir, env=env, capture_output=True, text=True,
                                             **kw)
    parent = [] if force or run("fetch", "-q", "hub", branch).returncode else ["-p", "FETCH_HEAD"]
    if parent:
        run("read-tree", "FETCH_HEAD", check=True)
    for path, text in files.items():
        blob = run("hash-object", "-w", "--stdin", input=text, check=True).stdout.strip()
        run("update-index", "--add", "--cacheinfo", f"100644,{blob},{path}", check=True)
    tree = run("write-tree", check=True).stdout.strip()
    commit = run("commit-tree", tree, *parent, "-m", "raw", check=True).stdout.strip()
    return run("push", *(["--force"] if force else []), "hub", f"{commit}:refs/heads/{branch}")


def test_a_malformed_file_on_the_hub_is_skipped_with_one_warning(fleet):
    alpha, mallory = fleet("alpha"), fleet("mallory")
    alpha.baseline()
    assert alpha.hub("publish").returncode == 0
    good = json.loads(hub_git(fleet.hub, "show", f"results/alpha:{hub_files(fleet.hub)[0]}"))
    assert push_raw(mallory, {"runs/mallory/torn.json": '{"agent": "mallory", "rec',
                              "runs/mallory/typed.json": json.dumps({**good, "agent": "mallory",
                                                                     "record": {**good["record"], "smoke": 5}}),
                              "runs/mallory/nofields.json": json.dumps({**good, "agent": "mallory", "record": {}}),
                              "runs/alpha/forged.json": json.dumps(good)},  # not mallory's folder: never read
                    branch="results/mallory").returncode == 0
    assert push_raw(mallory, {"claims/x/bad.json": "[]"}, branch="claims").returncode == 0
    board = alpha.hub("board")
    assert board.returncode == 0, board.stderr
    warnings = board.stderr.splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: hub: ") and w.endswith("skipped") for w in warnings)
    assert "runs/mallory/torn.json: Unterminated string" in board.stderr
    assert "runs/mallory/typed.json: the record's smoke field is of the wrong type" in board.stderr
    assert "runs/mallory/nofields.json: no time, commit" in board.stderr
    assert "claims/x/bad.json: not a claim or a release" in board.stderr
    assert "1 agent(s) (alpha), 3 runs" in board.stdout
    alpha.idea("twice the steps", "TOTAL = 2**15", [0.90])
    assert alpha.hub("publish").stdout.startswith("published 1 run(s)")  # publishing is not bothered either


def test_an_agent_that_tries_to_overwrite_another_agents_record_is_refused(fleet):
    alpha, impostor = fleet("alpha"), fleet("impostor")
    alpha.baseline()
    assert alpha.hub("publish").returncode == 0
    before = {path: hub_git(fleet.hub, "show", f"results/alpha:{path}") for path in hub_files(fleet.hub)}
    # the impostor holds alpha's records with one val_bpb changed, and publishes them under alpha's name
    records = [json.loads(line) for line in (alpha.dir / "runs.jsonl").read_text().splitlines()]
    records[0]["val_bpb"] = 0.5
    (impostor.dir / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for name in ("results.tsv", "verdicts.jsonl"):
        shutil.copy(alpha.dir / name, impostor.dir / name)
    result = impostor.hub("publish", AUTORESEARCH_AGENT="alpha")
    assert result.returncode == 0
    assert result.stdout.startswith("nothing new to publish: the hub has all 3 run(s)")
    assert result.stderr == (f"warning: 1 run(s) are on the hub with other content (runs/alpha/{records[0]['id']}"
                             f".json): left as they are, a file on the hub is never changed\n")
    assert {path: hub_git(fleet.hub, "show", f"results/alpha:{path}") for path in hub_files(fleet.hub)} == before
    # and below publish's plan, the commit itself refuses a path that is there
    impostor.git("fetch", "-q", "hub", "results/alpha:refs/remotes/hub/results/alpha")
    impostor.monkeypatch.chdir(impostor.dir)
    path = f"runs/alpha/{records[0]['id']}.json"
    with pytest.raises(SystemExit, match=f"error: refused: {path} is on the hub already"):
        hub.commit_files(impostor.git("rev-parse", "refs/remotes/hub/results/alpha"), {path: "{}"}, "x", "alpha")
    # around hub.py, the hub itself refuses a rewrite: a forced push of a results branch without alpha's files
    forced = push_raw(impostor, {"runs/impostor/x.json": "{}"}, branch="results/alpha", force=True)
    assert forced.returncode != 0 and "denying non-fast-forward" in forced.stderr
    assert hub_files(fleet.hub) == sorted(before)

# ---------------------------------------------------------------------------
# The docs' commands, run as written
# ---------------------------------------------------------------------------

def as_run(command, **names):
    """A command of the docs as a test runs it: this Python for `uv run`, <placeholders> filled in."""
    command = re.sub(r"<(\w+)>", lambda m: names[m.group(1)], command)
    return command.replace("uv run ", f"{sys.executable} {ROOT}/", 1)


def test_the_readmes_fleet_setup_makes_a_hub_that_refuses_rewrites(tmp_path, recording):
    (setup, _), (board, _) = [(body, lang) for lang, body in fenced_blocks(read(FLEET_DOC))]
    lines = setup.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("git remote add hub ")
    shared = str(tmp_path / "shared" / "fleet.git")
    alpha = Agent(tmp_path, "alpha", None, recording)
    for command in lines:
        result = subprocess.run(["bash", "-c", command.replace("/Volumes/shared/fleet.git", shared)], cwd=alpha.dir,
                                env=alpha.env, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr)
    alpha.baseline()
    assert alpha.hub("publish").stdout.startswith("published 3 run(s)")
    result = subprocess.run(["bash", "-c", as_run(board)], cwd=alpha.dir, env=alpha.env, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "1 agent(s) (alpha), 3 runs of 1 commits" in result.stdout, result.stderr
    forced = push_raw(alpha, {"x.json": "{}"}, branch="results/alpha", force=True)
    assert forced.returncode != 0 and "denying non-fast-forward" in forced.stderr
    deleted = subprocess.run(["git", "push", "hub", ":refs/heads/results/alpha"], cwd=alpha.dir, env=alpha.env,
                             capture_output=True, text=True)
    assert deleted.returncode != 0 and "deletion prohibited" in deleted.stderr


def test_program_mds_fleet_commands_in_a_night_of_two_agents(fleet):
    """The fleet section's commands in program.md's order: publish after a verdict, board and claim before an idea,
    release after its verdict, try another setup's best."""
    text = section(read(PROGRAM), "The fleet")
    commands = doc_commands(PROGRAM)
    fleet_commands = {c.split()[3]: c for c in commands if c.startswith("uv run hub.py") and c in text}
    assert set(fleet_commands.values()) == {"uv run hub.py publish", "uv run hub.py board", 'uv run hub.py claim '
                                            '"<idea>"', 'uv run hub.py release "<idea>"', "uv run hub.py try <agent>/<tag>"}
    publish, board, claim, release, tried = (fleet_commands[verb] for verb in ("publish", "board", "claim", "release",
                                                                               "try"))
    alpha, beta = fleet("alpha", chip="Test CPU A"), fleet("beta", chip="Test CPU B")
    do = lambda who, command, **names: subprocess.run(["bash", "-c", as_run(command, **names)], cwd=who.dir,
                                                      env=who.env, capture_output=True, text=True)
    for agent in (alpha, beta):
        agent.baseline()
        assert do(agent, publish).returncode == 0
    assert "2 agent(s) (alpha, beta), 6 runs of 2 commits" in do(alpha, board).stdout
    assert do(alpha, claim, idea="twice the steps").returncode == 0
    assert do(beta, claim, idea="twice the steps").returncode == 1  # beta must choose another idea
    alpha.idea("twice the steps", "TOTAL = 2**15", [0.9])
    assert do(alpha, publish).returncode == 0
    assert do(alpha, release, idea="twice the steps").stdout == "released 'twice the steps'\n"
    assert "twice the steps" in do(beta, board).stdout.split("RECENT IDEAS")[1]
    assert do(beta, tried, agent="alpha", tag="night").returncode == 0
    assert beta.git("log", "-1", "--format=%s").startswith("try alpha/night ")


@pytest.mark.slow
def test_bench_hub_runs(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_hub.py"), "--agents", "3",
                             "--runs", "2", "--concurrent", "2"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    title, header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["files", "board", "fresh"] and len(rows) == 2  # 1 and 2 runs per agent
    assert [int(row.split()[0]) for row in rows] == [3, 6]


def test_a_setup_whose_runs_agree_exactly_gives_no_gain_in_sigmas(fleet):
    """Short CPU smoke runs can repeat val_bpb to the last digit: sigma is then 0 (or a rounding error of it), and a
    gain in units of it means nothing."""
    alpha = fleet("alpha")
    alpha.baseline((3.157253, 3.157253, 3.157253))  # a CPU fleet's real baseline: its pooled sigma is 5.4e-16
    assert alpha.idea("twice the steps", "TOTAL = 2**15", [3.057253]) == "keep"  # the bar is MIN_GAIN
    assert alpha.hub("publish").returncode == 0
    (setup,) = json.loads(alpha.hub("board", "--json").stdout)["setups"]
    assert setup["sigma"] < 1e-9 and setup["best"][0]["gain"] == pytest.approx(0.1)
    assert setup["best"][0]["sigmas"] is None
    assert alpha.hub("board").stdout.count(" - ") >= 1
