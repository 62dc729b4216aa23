"""
The fleet: many agents, one per machine or several on one, sharing what they find through one git remote named
`hub`: a bare repository on a shared disk or a NAS, an ssh host, or a hosted repository. No server of our own:
git is the transport, the store and the lock. Read-only for the agent, like analysis.py.

Usage:
    uv run hub.py publish                       # this night's kept branch and every run the hub lacks
    uv run hub.py board [--json]                # the fleet's state: best per setup, recent ideas, claims
    uv run hub.py claim "<idea>"                # reserve an idea for CLAIM_HOURS; a second claimant is refused
    uv run hub.py release "<idea>"              # end your claim
    uv run hub.py try <agent>/<tag> [<commit>]  # another agent's kept change onto this branch, as one commit

What lives on the hub
---------------------
    refs/heads/agents/<agent>/<tag>   each agent's night (autoresearch/<tag>) up to its last kept commit
    refs/heads/results/<agent>        the agent's runs, runs/<agent>/<run id>.json: one file per run, with its
                                      record (runs.jsonl), its results.tsv row and its verdict (verdicts.jsonl)
    refs/heads/claims                 claims/<idea>/<time>-<agent>-claim.json and ...-release.json
Every write adds: a new commit on top of the hub's tip holding the tip's files plus new ones, pushed without
force. A file that is there is never changed or removed. When another writer landed first the push is rejected,
and hub.py fetches, builds again on the new tip and retries after a random pause. Only claims are shared by all
agents; each agent's runs have a branch of their own, which nobody else writes: with one results branch for all,
every publish of a fleet waited for every other (benchmarks/bench_hub.py, 20 agents publishing at once on one
core at only 100 files: 107 s and 1.04 s of CPU each, 172 pushes rejected; with a branch each, 0.18 s of CPU and
none rejected). publish writes only
agents/<its own name>/..., results/<its own name> and its own claims. A hub can also refuse rewrites itself:
`git config receive.denyNonFastForwards true` and `receive.denyDeletes true`.

Nothing fetched from the hub is executed: files are parsed as JSON, and a malformed one is skipped with one
warning. Another agent's code enters this branch only through `try`, by this agent's decision, and runs only when
the agent runs its trainer.

The board compares runs only within one setup (analysis.setup: harness, data, backend, chip, smoke-test knobs...):
val_bpb from another setup is on another scale. A setup's baseline is the mean of its nights' baseline runs (each
night's first commit), its sigma the pooled spread of its runs of identical code (analysis.noise); a kept commit's
gain is the baseline minus its mean, also in units of that sigma. A change kept again on a second setup, after a
`try` (its commit names the original in a Tried-from line), is confirmed.

Without a `hub` remote, or while the hub cannot be reached, publish says so in one line and exits 0: the local
loop goes on, and a later publish sends whatever the hub lacks.
"""

import argparse
import datetime
import hashlib
import itertools
import json
import os
import random
import re
import socket
import subprocess
import tempfile
import time

import analysis
from analysis import InputError, warn
from backends.device import detect_backend

HUB = "hub"               # the remote's name
RESULTS = "results"       # the hub's branches of run files: results/<agent>
CLAIMS = "claims"         # the hub's branch of claims
AGENT_ENV = "AUTORESEARCH_AGENT"
AGENT = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")  # a folder and a ref component anywhere
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,59}")
CLAIM_HOURS = 4           # a claim ends by itself after this: an agent that died does not hold its idea forever
RECENT = 30               # ideas the board lists, newest first
BEST = 5                  # kept commits the board lists per setup
# A smaller sigma is runs that agreed to val_bpb's last recorded digit (short CPU smoke runs do): a gain in units of
# it means nothing, and the board shows none
SIGMA_FLOOR = 5e-7
TRIED_FROM = "Tried-from"  # the line of a `try` commit's message that names the original
NETWORK_SECONDS = 120     # one fetch or push; past it the hub counts as unreachable
PATIENCE_SECONDS = 120    # retries of a rejected push before giving up (nothing is lost: publish again later)
# A fetch of branch names ending in "*": a hub without the branch yet fetches nothing instead of failing
FETCH = "+refs/heads/{0}*:refs/remotes/" + HUB + "/{0}*"  # "+": the local copy follows the hub; the hub is never forced
# What the board trusts of a record from the hub, beyond the fields' presence (analysis.checked_record)
RECORD_TYPES = {"time": str, "commit": (str, type(None)), "dirty": bool, "trainer": str, "trainer_sha": str,
                "harness": str, "backend": str, "chip": str, "smoke": list, "status": str}


class Unreachable(Exception):
    """The hub did not answer (or kept rejecting): git's own reason."""

# ---------------------------------------------------------------------------
# git
# ---------------------------------------------------------------------------

def git(*args, input=None, env=None, binary=False, timeout=60):
    """git's CompletedProcess; it never prompts for a password (an agent has nobody to answer)."""
    return subprocess.run(["git", *args], input=input, capture_output=True, text=not binary, timeout=timeout,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})})


def must(*args, **kwargs):
    """stdout of a local git command that must work (a failure means a broken repository: one line)."""
    result = git(*args, **kwargs)
    if result.returncode != 0:
        reason = (result.stderr.decode() if kwargs.get("binary") else result.stderr).strip().splitlines()
        raise InputError(f"git {args[0]} failed: {reason[-1] if reason else 'no message'}")
    return result.stdout


def rev(name):
    """The full hash name stands for, or None."""
    result = git("rev-parse", "--verify", "-q", f"{name}^{{commit}}")
    return result.stdout.strip() if result.returncode == 0 else None


def network(*args):
    """Fetch or push: the CompletedProcess, or Unreachable when git gave up or timed out."""
    try:
        return git(*args, timeout=NETWORK_SECONDS)
    except subprocess.TimeoutExpired:
        raise Unreachable(f"no answer in {NETWORK_SECONDS} s") from None


def reason(result):
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (fatal or lines or ["git failed"])[0]


def fetch(*branches):
    """The hub's branches into refs/remotes/hub/."""
    result = network("fetch", "-q", "--no-tags", "--no-write-fetch-head", HUB, *(FETCH.format(b) for b in branches))
    if result.returncode != 0:
        raise Unreachable(reason(result))


def push(refspecs):
    """Push without force: {remote ref: (flag, summary)}, flag "!" for a rejected ref (git push --porcelain)."""
    result = network("push", "--porcelain", HUB, *refspecs)
    status = {}
    for line in result.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and ":" in parts[1]:
            status[parts[1].split(":", 1)[1]] = (parts[0], parts[2])
    if not status:
        raise Unreachable(reason(result))
    return status


def cat(names):
    """The contents (bytes) of the objects names stand for, None for one that is missing: one git process."""
    if not names:
        return []
    out = must("cat-file", "--batch", input="".join(f"{n}\n" for n in names).encode(), binary=True)
    contents, at = [], 0
    for _ in names:
        end = out.index(b"\n", at)
        header = out[at:end].split()
        if header[-1] == b"missing" or len(header) != 3:
            contents.append(None)
            at = end + 1
            continue
        size = int(header[2])
        contents.append(out[end + 1:end + 1 + size])
        at = end + 1 + size + 1
    return contents


def files_under(ref, folder):
    """{path: blob hash} of the files below folder in ref's tree ({} when ref is None)."""
    if ref is None:
        return {}
    files = {}
    for entry in must("ls-tree", "-r", "-z", ref, "--", folder).split("\0"):
        if entry:
            meta, path = entry.split("\t", 1)
            files[path] = meta.split()[2]
    return files


def read_files(ref, folder):
    """[(path, text)] of the files below folder in ref's tree."""
    files = files_under(ref, folder)
    return [(path, None if data is None else data.decode("utf-8", "replace"))
            for path, data in zip(files, cat(list(files.values())))]


def fleet_runs():
    """[(path, text)] of every agent's runs: runs/<agent>/ of each results/<agent> branch fetched from the hub (a
    branch's files elsewhere are not the agent's to write, and are not read). Three git processes however many
    agents: the folders are read as tree objects (a name and a hash per entry) in one batch, their files in another."""
    prefix = f"refs/remotes/{HUB}/{RESULTS}/"
    agents, width = [], None
    for line in must("for-each-ref", "--format=%(objectname) %(refname)", prefix).splitlines():
        commit, ref = line.split(" ", 1)
        width = len(commit) // 2  # bytes of a hash: 20 (SHA-1) or 32 (SHA-256)
        if AGENT.fullmatch(ref[len(prefix):]):
            agents.append(ref[len(prefix):])
    paths, blobs = [], []
    for agent, tree in zip(agents, cat([f"{prefix}{a}:runs/{a}" for a in agents])):
        at = 0
        while tree and at < len(tree):  # entries: b"<mode> <name>\0" and the hash's raw bytes
            nul = tree.index(b"\0", at)
            paths.append(f"runs/{agent}/{tree[tree.index(b' ', at) + 1:nul].decode('utf-8', 'replace')}")
            blobs.append(tree[nul + 1:nul + 1 + width].hex())
            at = nul + 1 + width
    return [(path, None if data is None else data.decode("utf-8", "replace"))
            for path, data in zip(paths, cat(blobs))]


def commit_files(tip, files, message, agent):
    """A commit on top of tip (None: the first one) whose tree is tip's plus files ({path: text}), built in a
    temporary index: the work tree, the index and the checked-out branch are not touched."""
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, text in enumerate(files.values()):
            paths.append(os.path.join(folder, str(i)))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write(text)
        blobs = must("hash-object", "-w", "--stdin-paths", input="\n".join(paths) + "\n").split()
        index = {"GIT_INDEX_FILE": os.path.join(folder, "index")}
        if tip:
            must("read-tree", tip, env=index)
            there = must("ls-files", "--", *files, env=index).split()
            if there:  # plans leave out what is there; this is the rule itself, whatever a plan does
                raise InputError(f"refused: {', '.join(there[:3])} is on the hub already, and a file there is never "
                                 f"changed")
        must("update-index", "--add", "--index-info", env=index,
             input="".join(f"100644 {blob}\t{path}\n" for blob, path in zip(blobs, files)))
        tree = must("write-tree", env=index).strip()
        who = {f"GIT_{role}_{field}": value for role in ("AUTHOR", "COMMITTER")
               for field, value in (("NAME", agent), ("EMAIL", f"{agent}@autoresearch"))}
        return must("commit-tree", tree, *(["-p", tip] if tip else []), "-m", message, env=who).strip()


def land(branch, plan, message, agent, also=()):
    """Add files to the hub's branch in one commit on top of its tip, never changing a file that is there.
    plan(tip) returns {path: text} of the files to add, seeing the hub's newest tip (None before the branch exists),
    so it can leave out what is there or refuse. Rejected because another agent landed first: fetch, plan again on
    the new tip, retry after a random pause. also: more refspecs pushed with the first attempt. Returns the files
    added, {remote ref: (flag, summary)} of also's refs, and how many pushes were rejected."""
    tracking, deadline = f"refs/remotes/{HUB}/{branch}", time.monotonic() + PATIENCE_SECONDS
    also_status = {}
    for attempt in itertools.count():
        fetch(branch)
        tip = rev(tracking)
        files = plan(tip)
        new = commit_files(tip, files, message, agent) if files else None
        refspecs = list(also) + ([f"{new}:refs/heads/{branch}"] if new else [])
        status = push(refspecs) if refspecs else {}
        also_status = also_status or {ref: status[ref] for ref in status if ref != f"refs/heads/{branch}"}
        also = ()  # landed, up to date or refused for its own reason: once is enough
        if new is None or status.get(f"refs/heads/{branch}", ("!",))[0] != "!":
            if new:
                git("update-ref", tracking, new)
            return files, also_status, attempt
        if time.monotonic() > deadline:
            raise Unreachable(f"the hub's {branch} branch kept moving for {PATIENCE_SECONDS} s")
        time.sleep(random.uniform(0, min(2.0, 0.05 * 2 ** attempt)))  # jittered: concurrent agents spread out

# ---------------------------------------------------------------------------
# Who and where
# ---------------------------------------------------------------------------

def slug(text, limit):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")


def agent_name(records=None):
    """AUTORESEARCH_AGENT, or host and backend (the backend of this folder's latest run, else the one detected):
    stable across a night and readable on the board, e.g. studio-mlx."""
    name = os.environ.get(AGENT_ENV)
    if name is not None:
        if not AGENT.fullmatch(name):
            raise InputError(f"{AGENT_ENV}={name!r}: use 1 to 40 lowercase letters, digits and dashes (not at the "
                             f"ends), e.g. studio-mlx-2")
        return name
    records = analysis.read_runs() if records is None else records
    backend = records[-1]["backend"] if records else detect_backend()
    return f"{slug(socket.gethostname().split('.')[0], 30) or 'host'}-{backend}"


def night_tag(branch):
    """The night's name on the hub: autoresearch/<tag> -> <tag>; another branch's name, made ref-safe."""
    tag = branch[len("autoresearch/"):] if branch.startswith("autoresearch/") else branch
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip(".-")[:60] or "night"


def repository():
    """The checked-out branch and the hub's URL (None without a hub remote); one-line errors outside a branch."""
    branch = analysis.current_branch()
    if branch is None:
        raise InputError("not a git repository: run hub.py in the autoresearch checkout")
    if branch == "":
        raise InputError("HEAD is detached: check out the night's branch (git checkout autoresearch/<tag>) first")
    url = git("remote", "get-url", HUB)
    return branch, (url.stdout.strip() if url.returncode == 0 else None)


def hub_or_error(url, why):
    if url is None:
        raise InputError(f"no hub remote: {why} (join a fleet with `git remote add hub <url>`)")

# ---------------------------------------------------------------------------
# publish
# ---------------------------------------------------------------------------

def tried_from(commits):
    """{short commit: {"agent", "tag", "commit"}} for the commits a `try` made (their message names the original)."""
    found = {}
    for commit, data in zip(commits, cat(commits)):
        m = data and re.search(rf"^{TRIED_FROM}: ({AGENT.pattern})/({TAG.pattern}) ([0-9a-f]{{40}})$",
                               data.decode("utf-8", "replace"), re.MULTILINE)
        if m:
            found[commit] = {"agent": m.group(1), "tag": m.group(2), "commit": m.group(3)}
    return found


def night_files(agent, branch):
    """{path on the hub: text} for each of this night's runs that has its results.tsv row, and how many wait."""
    records = analysis.this_night(analysis.read_runs() or [], branch)
    rows = analysis.read_results() if os.path.isfile(analysis.RESULTS) else []
    verdicts = {v["run"]: v for _, v in analysis.read_jsonl(analysis.VERDICTS)
                if v.get("branch") == branch and v.get("run")}
    matched = analysis.match(rows, records)
    row_of = {matched[row["line"]]["line"]: row for row in rows if row["line"] in matched}
    tried = tried_from(sorted({r["commit"] for r in records if r["line"] in row_of and r["commit"]}))
    files = {}
    for record in records:
        row = row_of.get(record["line"])
        if row is None:
            continue
        record = {k: v for k, v in record.items() if k != "line"}
        # a record from before runs had ids is named by its content
        run_id = record.get("id") or hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
        entry = {"agent": agent, "tag": night_tag(branch), "record": record,
                 "row": row, "verdict": verdicts.get(record.get("id")),  # its line: the order of the night
                 "tried": tried.get(record["commit"])}
        files[f"runs/{agent}/{run_id}.json"] = json.dumps(entry, sort_keys=True) + "\n"
    return files, len(records) - len(files), rows


def publish():
    branch, url = repository()
    if url is None:
        print("no hub remote: nothing published (the local loop goes on; `git remote add hub <url>` joins a fleet)")
        return
    agent, tag = agent_name(), night_tag(branch)
    files, waiting, rows = night_files(agent, branch)
    kept, _ = analysis.last_kept_commit(rows, None)
    kept_full = rev(kept) if kept else None
    night_ref = f"refs/heads/agents/{agent}/{tag}"
    differ = []

    def plan(tip):
        there = files_under(tip, f"runs/{agent}/")
        same = [p for p in files if p in there]
        contents = dict(zip(same, cat([there[p] for p in same])))
        differ[:] = [p for p in same if contents[p] != files[p].encode()]
        return {p: text for p, text in files.items() if p not in there}

    try:
        added, status, rejected = land(f"{RESULTS}/{agent}", plan, f"{agent}: runs of {tag}", agent,
                                       also=[f"{kept_full}:{night_ref}"] if kept_full else [])
    except Unreachable as e:
        print(f"hub unreachable ({e}): nothing published; the local loop goes on, and the next publish sends all "
              f"that is missing")
        return
    busy = f"; {rejected} push(es) rejected while other agents landed first" if rejected else ""
    print(f"published {len(added)} run(s) of {tag} as {agent} ({len(files) - len(added)} already on the hub{busy})"
          if added else f"nothing new to publish: the hub has all {len(files)} run(s) of {tag} from {agent}")
    flag, summary = status.get(night_ref, (None, None))
    if flag == "!":
        warn(f"agents/{agent}/{tag} on the hub is not an ancestor of the last kept commit {kept} (was this branch "
             f"rewound, or is {tag} another night's name?): not pushed, and never forced ({summary})")
    elif flag is not None:
        print(f"agents/{agent}/{tag} at the last kept commit {kept}")
    if differ:
        warn(f"{len(differ)} run(s) are on the hub with other content ({', '.join(differ[:3])}): left as they are, "
             f"a file on the hub is never changed")
    if waiting:
        print(f"{waiting} run(s) of this night wait for their row in {analysis.RESULTS}: the next publish sends them")

# ---------------------------------------------------------------------------
# board
# ---------------------------------------------------------------------------

def parse_time(text):
    when = datetime.datetime.fromisoformat(text)
    return when if when.tzinfo else when.astimezone()


def parse_run(path, text):
    """The run file at path as {"agent", "tag", "record", "row", "verdict", "tried", "time"}, or None with one
    warning naming it: the hub holds what any agent pushed, and the board must survive a bad file."""
    parts = path.split("/")
    try:
        entry = json.loads(text)
        if not isinstance(entry, dict) or len(parts) != 3 or entry.get("agent") != parts[1]:
            raise ValueError(f"not a run of the agent {parts[1]!r}")
        record, row = entry.get("record"), entry.get("row")
        if not isinstance(record, dict) or not isinstance(row, dict):
            raise ValueError("no record or row")
        if analysis.checked_record(record, f"hub: {path}") is None:
            return None
        wrong = [k for k, kind in RECORD_TYPES.items() if not isinstance(record[k], kind)]
        if wrong or not all(isinstance(s, str) for s in record["smoke"]):
            raise ValueError(f"the record's {', '.join(wrong) or 'smoke'} field is of the wrong type")
        if (row.get("status") not in analysis.STATUSES or not isinstance(row.get("description"), str)
                or not isinstance(row.get("val_bpb"), (int, float)) or not isinstance(row.get("line"), int)):
            raise ValueError("the row has no status, val_bpb, description or line")
        tried = entry.get("tried")
        if not isinstance(entry.get("tag"), str) or tried is not None and not (
                isinstance(tried, dict) and all(isinstance(tried.get(k), str) for k in ("agent", "tag", "commit"))):
            raise ValueError("no tag, or a tried field without agent, tag and commit")
        entry["time"] = parse_time(record["time"])
    except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        warn(f"hub: {path}: {e}: skipped")
        return None
    return entry


def parse_event(path, text):
    """A claim or release file as a dict with its idea's slug and parsed times, or None with one warning."""
    parts = path.split("/")
    try:
        event = json.loads(text)
        if not isinstance(event, dict) or len(parts) != 3 or event.get("event") not in ("claim", "release"):
            raise ValueError("not a claim or a release")
        if not AGENT.fullmatch(str(event.get("agent"))) or not isinstance(event.get("idea"), str):
            raise ValueError("no agent or idea")
        event.update(slug=parts[1], at=parse_time(event["time"]))
        if event["event"] == "claim":
            event["until_at"] = parse_time(event["until"])
    except (ValueError, TypeError, KeyError) as e:
        warn(f"hub: {path}: {e}: skipped")
        return None
    return event


def open_claims(events, now):
    """{slug: the claim that holds it}: per idea, in time order, a claim takes a free idea (one whose holder released
    it or whose claim ran out) and a release by the holder frees it."""
    holders = {}
    for event in sorted(events, key=lambda e: e["at"]):
        holder = holders.get(event["slug"])
        free = holder is None or holder["until_at"] <= event["at"]
        if event["event"] == "claim" and free:
            holders[event["slug"]] = event
        elif event["event"] == "release" and not free and holder["agent"] == event["agent"]:
            del holders[event["slug"]]
    return {s: e for s, e in holders.items() if e["until_at"] > now}


def fleet(entries, events, now, recent=RECENT):
    """The board as one dict: per setup its baseline, sigma and best kept commits; the ideas tried recently; the open
    claims; the gains confirmed on a second setup."""
    commits = {}  # (agent, tag, commit): its runs in the order of its night's results.tsv
    counted = lambda e: analysis.trustworthy(e["record"]) and e["row"]["status"] != "crash"
    baselines = {}  # (agent, tag): the night's first commit with a result
    for entry in sorted(entries, key=lambda e: (e["agent"], e["tag"], e["row"]["line"])):
        night = (entry["agent"], entry["tag"])
        commits.setdefault((*night, entry["record"]["commit"]), []).append(entry)
        if counted(entry):
            baselines.setdefault(night, entry["record"]["commit"])
    is_baseline = lambda key: baselines.get(key[:2]) == key[2]
    latest = lambda key: (commits[key][-1]["time"], commits[key][-1]["row"]["line"])

    setups = {}
    for key, runs in commits.items():
        for e in filter(counted, runs):
            setups.setdefault(analysis.setup(e["record"]), {}).setdefault(key, []).append(e)
    order = sorted(setups, key=lambda s: -sum(map(len, setups[s].values())))
    number = {s: i + 1 for i, s in enumerate(order)}
    stats = {}
    for s in order:
        groups = {}
        for runs in setups[s].values():
            for e in runs:
                groups.setdefault(e["record"]["trainer_sha"], []).append(e["record"]["val_bpb"])
        base = [e["record"]["val_bpb"] for key, runs in setups[s].items() if is_baseline(key) for e in runs]
        stats[s] = {"noise": analysis.noise(groups.values()), "baseline": analysis.mean(base) if base else None,
                    "baseline_runs": len(base)}

    def measured(key, s):
        """A commit's mean val_bpb on setup s, its gain over the setup's baseline, and the gain in sigma."""
        values = [e["record"]["val_bpb"] for e in setups[s][key]]
        base, sigma = stats[s]["baseline"], stats[s]["noise"]["sigma"]
        gain = None if base is None else base - analysis.mean(values)
        return {"setup": number[s], "val_bpb": analysis.mean(values), "runs": len(values), "gain": gain,
                "sigmas": gain / sigma if gain is not None and sigma and sigma >= SIGMA_FLOOR else None}

    def describe(key):
        runs = commits[key]
        return {"agent": key[0], "tag": key[1], "commit": key[2], "status": runs[-1]["row"]["status"],
                "description": runs[-1]["row"]["description"], "time": runs[-1]["time"].isoformat()}

    confirmed = []
    for key, runs in commits.items():
        tried = runs[-1]["tried"]
        if not tried or runs[-1]["row"]["status"] != "keep":
            continue
        original = (tried["agent"], tried["tag"], tried["commit"][:7])
        theirs = {s for s in setups if original in setups[s]}
        for s in (s for s in setups if key in setups[s] and theirs and s not in theirs):
            confirmed.append({"original": {**describe(original), **measured(original, min(theirs, key=number.get))},
                              "by": {**describe(key), **measured(key, s)}})
    confirmed_keys = {(c["original"]["agent"], c["original"]["tag"], c["original"]["commit"]) for c in confirmed}

    board = {"agents": sorted({k[0] for k in commits}), "runs": len(entries), "commits": len(commits), "setups": []}
    for s in order:
        kept = [k for k in setups[s] if commits[k][-1]["row"]["status"] == "keep" and not is_baseline(k)]
        best = sorted((dict(describe(k), **measured(k, s), confirmed=k in confirmed_keys) for k in kept),
                      key=lambda b: b["val_bpb"])[:BEST]
        board["setups"].append({"setup": number[s], "key": dict(zip(analysis.SETUP_NAMES, s)),
                                "label": analysis.describe_setup(next(iter(setups[s].values()))[0]["record"]),
                                "baseline": stats[s]["baseline"], "baseline_runs": stats[s]["baseline_runs"],
                                "sigma": stats[s]["noise"]["sigma"], "dof": stats[s]["noise"]["dof"], "best": best})
    ideas = sorted((k for k in commits if not is_baseline(k)), key=latest, reverse=True)
    board["recent"] = []
    for key in ideas[:recent]:
        where = [s for s in order if key in setups[s]]
        board["recent"].append({**describe(key), **(measured(key, where[0]) if where else
                                                    {"setup": None, "runs": len(commits[key])})})
    board["claims"] = [{"idea": c["idea"], "agent": c["agent"], "since": c["time"], "until": c["until"]}
                       for c in sorted(open_claims(events, now).values(), key=lambda c: c["at"])]
    board["confirmed"] = confirmed
    return board


def format_board(board, url):
    f6 = lambda v: "-" if v is None else f"{v:.6f}"
    sig = lambda v: "-" if v is None else f"{v:+.1f}"
    lines = [f"fleet at {url}: {len(board['agents'])} agent(s) ({', '.join(board['agents'])}), {board['runs']} runs of "
             f"{board['commits']} commits", "",
             "BEST KEPT COMMITS PER SETUP (gain: the setup's baseline minus the commit's mean val_bpb; sigmas: the "
             "gain in units of the setup's sigma)"]
    for s in board["setups"]:
        lines += ["", f"setup {s['setup']}: {s['label']}",
                  f"  baseline {f6(s['baseline'])} ({s['baseline_runs']} runs), sigma {f6(s['sigma'])} "
                  f"(dof {s['dof']})"]
        if not s["best"]:
            lines.append("  no gain kept yet")
            continue
        lines.append(f"  {'val_bpb':9} {'gain':9} {'sigmas':>6}  {'agent/tag':24} {'commit':8} description")
        for b in s["best"]:
            lines.append(f"  {f6(b['val_bpb']):9} {f6(b['gain']):9} {sig(b['sigmas']):>6}  "
                         f"{b['agent'] + '/' + b['tag']:24} {b['commit']:8} {b['description']}"
                         + ("  [CONFIRMED]" if b["confirmed"] else ""))
    lines += ["", f"RECENT IDEAS, newest first (kept or not: do not repeat them)"]
    for r in board["recent"]:
        setup = "-" if r["setup"] is None else str(r["setup"])
        lines.append(f"  {r['time'][:16]}  {r['status']:7} {sig(r.get('sigmas')):>6}  setup {setup:3} "
                     f"{r['agent'] + '/' + r['tag']:24} {r['commit']:8} {r['description']}")
    if not board["recent"]:
        lines.append("  none yet")
    lines += ["", "OPEN CLAIMS (ideas another agent is working on: leave them)"]
    lines += [f"  {c['idea']!r}  by {c['agent']} until {c['until'][:16]}" for c in board["claims"]] or ["  none"]
    lines += ["", "CONFIRMED: gains kept again on a second setup (after `hub.py try`)"]
    for c in board["confirmed"]:
        o, b = c["original"], c["by"]
        lines.append(f"  {o['agent']}/{o['tag']} {o['commit']} {o['description']!r} (setup {o['setup']}, "
                     f"{sig(o['sigmas'])} sigma) kept by {b['agent']}/{b['tag']} {b['commit']} on setup {b['setup']} "
                     f"({sig(b['sigmas'])} sigma)")
    if not board["confirmed"]:
        lines.append("  none yet")
    return "\n".join(lines)


def show_board(as_json, recent):
    _, url = repository()
    hub_or_error(url, "no fleet to show")
    try:
        fetch(f"{RESULTS}/", CLAIMS)
    except Unreachable as e:
        raise InputError(f"hub unreachable: {e}") from None
    entries = [e for e in (parse_run(p, t) for p, t in fleet_runs()) if e is not None]
    events = [e for e in (parse_event(p, t) for p, t in read_files(rev(f"refs/remotes/{HUB}/{CLAIMS}"), "claims/"))
              if e is not None]
    board = fleet(entries, events, datetime.datetime.now(datetime.timezone.utc), recent)
    print(json.dumps({"hub": url, **board}, indent=2) if as_json else format_board(board, url), flush=True)

# ---------------------------------------------------------------------------
# claim, release
# ---------------------------------------------------------------------------

def claim(idea, kind):
    """Add a claim (kind "claim") or a release of idea, after checking the hub's newest claims of it."""
    _, url = repository()
    hub_or_error(url, f"nothing to {kind}")
    name, agent = slug(idea, 60), agent_name()
    if not name:
        raise InputError(f"the idea {idea!r} has no letters or digits: say in a few words what you will try")
    now = datetime.datetime.now(datetime.timezone.utc)
    outcome = {}

    def plan(tip):
        events = [e for e in (parse_event(p, t) for p, t in read_files(tip, f"claims/{name}/")) if e is not None]
        holder = open_claims(events, now).get(name)
        if kind == "claim" and holder and holder["agent"] != agent:
            raise InputError(f"refused: {idea!r} is claimed by {holder['agent']} until {holder['until'][:16]}: "
                             f"choose another idea")
        if kind == "release" and (holder is None or holder["agent"] != agent):
            raise InputError(f"no open claim of yours on {idea!r}" + (f" (it is {holder['agent']}'s)" if holder
                                                                       else ""))
        outcome["holder"] = holder
        if kind == "claim" and holder:
            return {}  # already ours
        event = {"event": kind, "idea": idea, "agent": agent, "time": now.isoformat()}
        if kind == "claim":
            event["until"] = (now + datetime.timedelta(hours=CLAIM_HOURS)).isoformat(timespec="seconds")
        return {f"claims/{name}/{now:%Y%m%dT%H%M%S%fZ}-{agent}-{kind}.json": json.dumps(event, sort_keys=True) + "\n"}

    try:
        added, _, _ = land(CLAIMS, plan, f"{agent}: {kind} {name}", agent)
    except Unreachable as e:
        raise InputError(f"hub unreachable ({e}): nothing {kind}ed") from None
    if kind == "release":
        print(f"released {idea!r}")
    elif added:
        print(f"claimed {idea!r} as {agent} for {CLAIM_HOURS} hours")
    else:
        print(f"{idea!r} is already yours until {outcome['holder']['until'][:16]}")

# ---------------------------------------------------------------------------
# try
# ---------------------------------------------------------------------------

def try_change(source, commit):
    """Another agent's kept change (a commit's diff against its parent) onto this branch as one new commit that
    names the original. Nothing runs: the agent runs it, asks the verdict and publishes."""
    branch, url = repository()
    hub_or_error(url, "nothing to try")
    agent, _, tag = source.partition("/")
    if not AGENT.fullmatch(agent) or not TAG.fullmatch(tag):
        raise InputError(f"{source!r}: name another agent's night as <agent>/<tag>, as the board shows it")
    if must("status", "--porcelain", "--untracked-files=no").strip():
        raise InputError("uncommitted changes: commit them or `git reset --hard` first; try adds one commit")
    ref = f"refs/remotes/{HUB}/agents/{agent}/{tag}"
    try:
        result = network("fetch", "-q", "--no-tags", "--no-write-fetch-head", HUB,
                         f"+refs/heads/agents/{agent}/{tag}:{ref}")
    except Unreachable as e:
        raise InputError(f"hub unreachable ({e}): nothing tried") from None
    if result.returncode != 0:
        raise InputError(f"no agents/{agent}/{tag} on the hub ({reason(result)})")
    tip = rev(ref)
    target = rev(commit) if commit else tip
    if target is None or git("merge-base", "--is-ancestor", target, tip).returncode != 0:
        raise InputError(f"{commit!r} is not a commit of agents/{agent}/{tag}: name one the board lists")
    changed = must("diff", "--name-only", f"{target}^", target).split()
    fixed = [f for f in changed if f.split("/")[0] in analysis.FIXED_FILES.split()]
    if fixed:
        raise InputError(f"{target[:7]} changes fixed files ({', '.join(fixed)}): its runs are another harness, "
                         f"nothing to try")
    picked = git("cherry-pick", "--no-commit", target)
    if picked.returncode != 0:
        git("cherry-pick", "--abort")
        git("reset", "--hard", "-q", "HEAD")
        raise InputError(f"{target[:7]}'s change does not apply to this branch ({reason(picked)}): nothing changed")
    if not must("diff", "--cached", "--name-only").strip():
        raise InputError(f"this branch already has {target[:7]}'s change: nothing to try")
    subject = must("log", "-1", "--format=%s", target).strip()
    message = f"try {agent}/{tag} {target[:7]}: {subject}\n\n{TRIED_FROM}: {agent}/{tag} {target}\n"
    committed = git("commit", "-q", "-m", message)
    if committed.returncode != 0:
        git("reset", "--hard", "-q", "HEAD")
        raise InputError(f"git commit failed: {reason(committed)}")
    print(f"HEAD {rev('HEAD')[:7]}: {agent}/{tag} {target[:7]}'s change ({', '.join(changed)}) as one commit on "
          f"{branch}. Run it, ask for the verdict and publish: a keep on this setup confirms it")

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Share this agent's runs with a fleet through the git remote 'hub' "
                                     "(this file's docstring says what lives there)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    commands.add_parser("publish", help="push the night's kept branch and every run the hub lacks")
    board = commands.add_parser("board", help="the fleet's best per setup, recent ideas, claims, confirmed gains")
    board.add_argument("--json", action="store_true", help="print it as one JSON object")
    board.add_argument("--recent", type=int, default=RECENT, metavar="N", help=f"ideas to list (default {RECENT})")
    for kind, what in (("claim", f"reserve an idea for {CLAIM_HOURS} hours"), ("release", "end your claim")):
        commands.add_parser(kind, help=what).add_argument("idea", help="the idea, in a few words")
    tried = commands.add_parser("try", help="another agent's kept change onto this branch as one commit")
    tried.add_argument("source", metavar="AGENT/TAG", help="the night, as the board names it")
    tried.add_argument("commit", nargs="?", help="one of its kept commits (default: its last)")
    args = parser.parse_args()
    if AGENT_ENV in os.environ:
        agent_name()  # a bad name is an error whatever the command
    if args.command == "publish":
        publish()
    elif args.command == "board":
        show_board(args.json, args.recent)
    elif args.command in ("claim", "release"):
        claim(args.idea, args.command)
    else:
        try_change(args.source, args.commit)


if __name__ == "__main__":
    main()
