"""No committed file names a path on the machine it was written on.

Scans every file git tracks (source, tests, docs, bench/results, data READMEs, ...), plus
files not yet added that git does not ignore, so a new file is checked before its commit.
Paths are written relative to the repository, or with a name for their root
(``$TOKENSURGEON_CACHE``, ``$TMPDIR``, ``~``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# An absolute path under the work folder, a home or /tmp, after a quote, space, bracket, =, :,
# comma or backtick, or at a line start (the roots are joined here so that this file does
# not match itself).
ROOTS = ("/" + "work/", "/" + "root/", r"/home/\w+/", "/" + "tmp/", r"/Users/\w+/")
MACHINE_PATH = re.compile(r"""(?:^|["'\s(=\[:,`])(""" + "|".join(ROOTS) + ")", re.MULTILINE)


def repository_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=True).stdout.decode().split("\0")
    return [ROOT / name for name in listed if name and (ROOT / name).is_file()]


def machine_paths(text: str) -> list[str]:
    return sorted({m.group(1) for m in MACHINE_PATH.finditer(text)})


def test_the_pattern_finds_machine_paths_and_spares_relative_ones():
    # The samples are built from pieces so that this file itself holds no machine path.
    work, root, tmp, home = ("/" + d + "/" for d in ("work", "root", "tmp", "home/alice"))
    assert machine_paths(f'VLLM = Path("{work}venv-vllm/bin/python")') == [work]
    assert machine_paths(f"cd {work}main && make") == [work]
    assert machine_paths(f'{{"dir": "{root}.cache/tokensurgeon/models"}}') == [root]
    assert machine_paths(f"--cache {tmp}x") == [tmp]
    assert machine_paths(f"{home}x at a line start") == [home]
    assert machine_paths("out/tmp/x bench/work/y $TMPDIR/z ~/.cache ../shared/data") == []


def test_no_tracked_file_names_a_machine_path():
    found = {}
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary (figures, weights): no paths to read
            continue
        hits = machine_paths(text)
        if hits:
            found[str(path.relative_to(ROOT))] = hits
    assert not found, (f"machine paths in {len(found)} file(s): {found}; write them relative "
                       "to the repository or with a name for the root ($TOKENSURGEON_CACHE, "
                       "$TMPDIR, ~)")
