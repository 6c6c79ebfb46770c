"""Build hook: record the git commit the package is built from (``matbench_dim/_build.json``).

Everything else about the package is in ``pyproject.toml``. tox (and ``pip install .``)
builds an sdist from the checkout and installs from the unpacked sdist, where no git
history exists; so the commit is written into the sdist tree when it is made, and into the
build tree when building straight from a checkout. An installed package reads it back in
``matbench_dim.tracking.runs.git_commit``; a build without git writes nothing and runs
record ``git.commit = unknown``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
BUILD_INFO = Path("matbench_dim") / "_build.json"


def _git_info() -> dict | None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(HERE), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != HERE:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"git_commit": commit, "git_dirty": dirty}


def _write(root: Path) -> None:
    info = _git_info()
    if info is not None:
        (root / BUILD_INFO).parent.mkdir(parents=True, exist_ok=True)
        (root / BUILD_INFO).write_text(json.dumps(info) + "\n")


class SdistWithCommit(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        _write(Path(base_dir))


class BuildPyWithCommit(build_py):
    def run(self):
        super().run()
        if not self.dry_run:
            _write(Path(self.build_lib))  # from a checkout; an sdist already carries the file


setup(cmdclass={"sdist": SdistWithCommit, "build_py": BuildPyWithCommit})
