"""`python -m bench --against REV`: every vbp target of the run twice, once from this code
and once from the code of commit REV, alternated in the same rounds.

Why: on this shared 2-core machine the references and vbp move 20-30 % between two runs,
so two single runs cannot show a change of 10 %. Within one run the two codes meet the
same machine, round after round, and each round swaps which of the two goes first. The
report adds the ratio of this code to REV's, per workload and target (bench/report.py).

REV's code is `git archive` of the commit, its C extension built beside it with the flags
of setup.py, and its sandboxes run from there: `vbp` with PYTHONPATH naming it, and blockd
(`python -m blockd.main`, whose path starts at its working directory) started from it.
The venv, its libraries and the tools are this run's.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEP = "@"  # a target's name from REV's code: "vbp-r3@1a2b3c4"


def resolve(rev: str, repo: Path = ROOT) -> str:
    """The full commit id of `rev`; ValueError when the repository has no such commit."""
    r = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                       cwd=repo, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        raise ValueError(f"--against {rev}: no such commit in {repo}")
    return r.stdout.strip()


def short(commit: str, repo: Path = ROOT) -> str:
    r = subprocess.run(["git", "rev-parse", "--short", commit], cwd=repo, capture_output=True,
                       text=True, check=True)
    return r.stdout.strip()


def checkout(commit: str, into: Path, repo: Path = ROOT) -> Path:
    """The tree of `commit`, written under `into` (git archive: no work tree, no index of
    the repository touched), with vbp's C extension built in place when it has one.
    RuntimeError when the build fails: the Python stand-ins would run instead, slower, and
    the comparison would be of them."""
    src = into / f"src-{commit[:12]}"
    src.mkdir(parents=True)
    with subprocess.Popen(["git", "archive", "--format=tar", commit], cwd=repo,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as p:
        with tarfile.open(fileobj=p.stdout, mode="r|") as tar:
            tar.extractall(src, filter="data")
        err = p.stderr.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"git archive {commit} failed: {err.strip()}")
    if (src / "vbp" / "_pagesums.c").exists():
        build_extension(src)
    return src


def build_extension(src: Path) -> None:
    """vbp/_pagesums.c of `src` built in place, as setuptools builds setup.py's Extension:
    the interpreter's compiler, CFLAGS and CCSHARED, then setup.py's extra arguments
    (-O2 -Wall -Werror), the Python headers, libxxhash."""
    var = sysconfig.get_config_var
    out = f"vbp/_pagesums{var('EXT_SUFFIX')}"
    cmd = [*shlex.split(var("CC") or "cc"), *shlex.split(var("CFLAGS") or ""),
           *shlex.split(var("CCSHARED") or "-fPIC"), "-O2", "-Wall", "-Werror",
           f"-I{sysconfig.get_paths()['include']}", "-shared", "vbp/_pagesums.c", "-lxxhash",
           "-o", out]
    r = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building {src / 'vbp/_pagesums.c'} failed: "
                           f"{(r.stderr or r.stdout).strip()[-2000:]}")


def environment(src: Path) -> dict:
    """The environment of `vbp` run from `src`: its packages first on the path."""
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(src) + (os.pathsep + old if old else ""))


def twin(name: str, label: str) -> str:
    return f"{name}{SEP}{label}"


def base(name: str) -> str:
    """The target a twin stands beside ("vbp-r3@1a2b3c4" -> "vbp-r3")."""
    return name.split(SEP, 1)[0]


def first_rounds(rounds: int) -> int:
    """Of `rounds`, those in which this code runs before its twin (harness.round_order:
    the even ones, from 0): half for an even count, one more for an odd one."""
    return (rounds + 1) // 2


def units(names: list[str]) -> list[list[str]]:
    """`names` in their order, each target with its twins right after it in one unit (a
    twin whose target is not in `names` is a unit of its own): the rounds keep a unit
    together and alternate its order, so the two codes run one after the other, each
    first every other round."""
    out: list[list[str]] = []
    by_base: dict[str, list[str]] = {}
    for n in names:
        if SEP not in n:
            by_base[n] = [n]
            out.append(by_base[n])
    for n in names:
        if SEP in n:
            unit = by_base.get(base(n))
            if unit is None:
                out.append([n])
            else:
                unit.append(n)
    return out
