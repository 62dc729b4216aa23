"""
The two things the run record (backends/record.py, at train time) and analysis.py (the verdict) both do to the
night's files: append one JSON object as a line of its own, and ask git. Standard library only, so analysis.py
stays quick to start.
"""
import json
import os
import subprocess


def append(path, entry):
    """Append entry to a JSON-lines file on a fresh line (a torn last line, from a full disk or a killed writer, ends
    where it is and costs that line only), flushed to disk before the next reader. Raises OSError."""
    line = json.dumps(entry).encode() + b"\n"
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def git(folder, *args):
    """git's output in folder, or None outside a repository (or without git)."""
    try:
        result = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None
