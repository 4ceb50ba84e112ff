"""The servers a benchmark run compares: two references (qemu-nbd and nbdkit's file plugin,
each on a raw file) and vbp volumes on sandboxes of real blockd processes.

Every target is a context manager: entering starts what it needs on free loopback ports,
leaving stops exactly the processes it started (references with SIGTERM then SIGKILL, and a
parent-death signal in case this process dies first; sandboxes with `vbp sandbox down`).
Each target also names the server processes whose CPU time the harness charges to it.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import against

VENV_BIN = Path(sys.executable).parent
PR_SET_PDEATHSIG = 1


class TargetError(RuntimeError):
    pass


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the harness dies without cleaning up."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def ports_free(ports) -> bool:
    for p in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def free_port_range(count: int, tries: int = 200) -> int:
    """A base port such that base..base+count-1 are free on loopback right now. Random
    start points keep parallel runs by other people from colliding with us."""
    for _ in range(tries):
        base = random.randrange(20000, 60000 - count)
        if ports_free(range(base, base + count)):
            return base
    raise TargetError(f"no {count} free consecutive loopback ports found")


def wait_port(port: int, proc: subprocess.Popen | None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TargetError(f"{proc.args[0]} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TargetError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def cpu_seconds(pids) -> float:
    """User + system CPU seconds used so far by the processes `pids` (and their threads)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def machine_cpu() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy, all CPUs summed: (busy, kernel), from
    /proc/stat. busy = user + nice + system + irq + softirq; kernel = system + irq +
    softirq. Over a job it counts everything the job costs, the client's and the kernel's
    work included (loopback TCP, page cache, writeback threads), not only the server's."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    tick = os.sysconf("SC_CLK_TCK")
    kernel = v[2] + v[5] + v[6]
    return (v[0] + v[1] + kernel) / tick, kernel / tick


def make_raw_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Target:
    """One NBD export under test. `name` is the label in reports ("qemu-nbd", "vbp-r1"...)."""

    name: str = "?"
    kind: str = "reference"
    uri: str = ""

    def pids(self) -> list[int]:
        return []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass


class ProcessTarget(Target):
    def __init__(self, workdir: Path, size: int):
        self.workdir = workdir
        self.size = size
        self.proc: subprocess.Popen | None = None
        self.log = None

    def command(self, port: int, image: Path) -> list[str]:
        raise NotImplementedError

    def start(self) -> "ProcessTarget":
        image = make_raw_file(self.workdir / f"{self.name}.raw", self.size)
        for _ in range(5):
            port = free_port_range(1)
            self.log = open(self.workdir / f"{self.name}.log", "ab")
            self.proc = subprocess.Popen(self.command(port, image), stdin=subprocess.DEVNULL,
                                         stdout=self.log, stderr=self.log,
                                         preexec_fn=_die_with_parent, start_new_session=True)
            try:
                wait_port(port, self.proc)
            except TargetError:
                stop_process(self.proc)
                continue  # most likely someone took the port between our probe and bind
            self.uri = f"nbd://127.0.0.1:{port}/{self.export}"
            return self
        raise TargetError(f"{self.name} did not start; see {self.workdir / (self.name + '.log')}")

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None


class QemuNbd(ProcessTarget):
    name = "qemu-nbd"
    export = "disk"

    def command(self, port, image):
        return ["qemu-nbd", "-f", "raw", "-t", "--shared=16", "--cache=writeback",
                "-b", "127.0.0.1", "-p", str(port), "-x", self.export, str(image)]


class NbdkitFile(ProcessTarget):
    name = "nbdkit"
    export = "disk"  # the file plugin serves any export name

    def command(self, port, image):
        return ["nbdkit", "-f", "--exit-with-parent", "-p", str(port), "-i", "127.0.0.1",
                "file", str(image)]


class NbdkitFileTLS(NbdkitFile):
    """nbdkit's file plugin with TLS offered (--tls=on): nbds:// clients upgrade, nbd://
    ones need not. `certificates`: a directory with ca-cert.pem, server-cert.pem and
    server-key.pem (nbdkit's layout)."""

    name = "nbdkit"

    def __init__(self, workdir: Path, size: int, certificates: Path):
        super().__init__(workdir, size)
        self.certificates = certificates

    def command(self, port, image):
        return ["nbdkit", "-f", "--exit-with-parent", "-p", str(port), "-i", "127.0.0.1",
                "--tls=on", f"--tls-certificates={self.certificates}", "file", str(image)]


class BarePython(ProcessTarget):
    """bench/bare_server.py: the fastest shape a Python server can take (DESIGN.md, Speed),
    not a reference to beat but the ceiling a Python vbp can reach on this machine."""

    name = "py-bare"
    export = "disk"  # any export name
    checksums = False
    threads = False
    splice = False

    def command(self, port, image):
        return [sys.executable, str(Path(__file__).with_name("bare_server.py")),
                "--port", str(port), str(image), *(["--checksums"] if self.checksums else []),
                *(["--threads"] if self.threads else []), *(["--splice"] if self.splice else [])]


class BarePythonChecksums(BarePython):
    name = "py-bare-xxh"
    checksums = True


class BarePythonThreads(BarePythonChecksums):
    """--threads: the same work, with checksums, spread over three threads per connection
    so that the system calls of one request overlap those of the next."""

    name = "py-threads-xxh"
    threads = True


class BarePythonSplice(BarePythonChecksums):
    """--splice: a write's payload goes from the socket to the file by splice(2) through a
    pipe, never into the process; checksums from the page cache. One request at a time."""

    name = "py-splice-xxh"
    splice = True


class VbpSandbox:
    """A `vbp sandbox` of `hosts` blockd processes under `directory`, driven by the CLI
    (the stable interface). Leaving stops it with `vbp sandbox down`."""

    def __init__(self, directory: Path, hosts: int, capacity: str = "64G",
                 settings: dict | None = None, code: Path | None = None):
        self.root = directory
        self.hosts = hosts
        self.capacity = capacity  # thin: chunk slots are sparse, so this costs no disk
        self.settings = settings or {}  # blockd settings of every host (`--set KEY=VALUE`)
        self.code = code  # another commit's tree to run from (bench/against.py), or None
        self.dir: Path | None = None
        self.info: dict = {}

    @property
    def registry(self) -> str:
        return f"lmdb://{self.dir / 'registry'}"

    def vbp(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        env = dict(os.environ) if self.code is None else against.environment(self.code)
        if self.dir:
            env["VBP_REGISTRY"] = self.registry
        return subprocess.run([str(VENV_BIN / "vbp"), *args], capture_output=True, text=True,
                              env=env, timeout=timeout, cwd=self.code)

    def start(self) -> "VbpSandbox":
        last = ""
        for attempt in range(4):
            code = "" if self.code is None else f"-{self.code.name}"
            self.dir = self.root / f"sandbox{self.hosts}{code}-{attempt}"
            base = free_port_range(2 * self.hosts)
            for _ in range(2):  # `up` is idempotent; a second call settles a slow start
                sets = [a for k, v in self.settings.items() for a in ("--set", f"{k}={v}")]
                r = self.vbp("sandbox", "up", "--hosts", str(self.hosts), "--dir", str(self.dir),
                             "--base-port", str(base), "--capacity", self.capacity, "--json",
                             *sets)
                if r.returncode == 0:
                    self.info = json.loads(r.stdout)
                    return self
                last = r.stderr.strip()
            self.down()
        raise TargetError(f"vbp sandbox up --hosts {self.hosts} failed: {last}")

    def pids(self) -> list[int]:
        return [h["pid"] for h in self.info.get("hosts", []) if h.get("pid")]

    def nbd_port(self, i: int = 0) -> int:
        return self.info["hosts"][i]["nbd_port"]

    def create_volume(self, name: str, size: int, replicas: int, chunk_size: str = "4M") -> str:
        r = self.vbp("volume", "create", name, "--size", str(size), "--replicas", str(replicas),
                     "--chunk-size", chunk_size, "--json")
        if r.returncode != 0:
            raise TargetError(f"vbp volume create {name}: {r.stderr.strip()}")
        return f"nbd://127.0.0.1:{self.nbd_port()}/{name}"

    def down(self) -> None:
        if self.dir is not None and self.dir.exists():
            self.vbp("sandbox", "down", "--dir", str(self.dir), timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.down()


class VbpTarget(Target):
    """One vbp volume (its gateway is the sandbox's first host)."""

    kind = "vbp"

    def __init__(self, name: str, sandbox: VbpSandbox, volume: str, size: int, replicas: int):
        self.name = name
        self.sandbox = sandbox
        self.volume = volume
        self.replicas = replicas
        self.uri = sandbox.create_volume(volume, size, replicas)

    def pids(self) -> list[int]:
        return self.sandbox.pids()


def tool_versions() -> dict:
    out = {}
    for tool, args in (("qemu-nbd", ["--version"]), ("nbdkit", ["--version"]),
                       ("fio", ["--version"]), ("nbdcopy", ["--version"])):
        if shutil.which(tool) is None:
            out[tool] = None
            continue
        r = subprocess.run([tool, *args], capture_output=True, text=True)
        out[tool] = (r.stdout or r.stderr).splitlines()[0].strip() if (r.stdout or r.stderr) else "?"
    return out
