"""A local multi-host pool on one machine: N blockd processes on loopback ports sharing an
embedded LMDB registry under one directory. For demos (`make run`) and tests.

Layout of DIR: `registry/` (the LMDB registry), `hostN/` (each host's data dir and
`blockd.log`), `sandbox.json` (ports, pids and the registry URL). `up --registry URL` puts
the hosts on another registry instead (etcd://HOST:PORT for a pool on a real etcd); the URL
is remembered, so a later `up` restarts missing hosts on the same registry. `up` is
idempotent: it starts only the hosts that are not running; `down` stops every process it
started (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from blockd.config import SettingError, coerce_setting, from_settings, parse_hostport
from vbp.errors import BadValue, InvalidArgument, VbpError

STATE_FILE = "sandbox.json"
# blockd settings each host gets from the sandbox as flags (Sandbox._flags), which win over
# its blockd.toml: a --set of one would be silently ignored
SPAWN_KEYS = ("host_id", "data_dir", "registry", "listen", "nbd", "capacity", "zone", "pod")
SET = "--set"  # the source of `up --set` settings, as their errors name it (SettingError)
DEFAULT_BASE_PORT = 10809
DEFAULT_CAPACITY = "8G"


class SandboxError(VbpError):
    pass


STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def _config_text(settings: dict) -> str:
    """A host's blockd.toml: JSON values are TOML values for strings, numbers, booleans
    and lists (null, NaN and objects are not: _check_settings refuses them)."""
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(settings.items()))


@dataclass
class SandboxHost:
    id: str
    nbd_port: int
    peer_port: int
    pid: int = 0
    alive: bool = False

    @property
    def nbd_uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}"


def pid_alive(pid: int) -> bool:
    """True if `pid` runs a blockd (guards against a recycled pid)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return b"blockd" in cmd and state != "Z"


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def ports_free(ports) -> bool:
    for p in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


class Sandbox:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory).absolute()
        self._procs: dict[int, subprocess.Popen] = {}  # the processes this object started
        self._ids: dict[int, str] = {}  # pid -> host id of those

    @property
    def registry_url(self) -> str:
        try:
            url = self._load().get("registry")
        except SandboxError:
            url = None
        return url or self.default_registry_url

    @property
    def default_registry_url(self) -> str:
        return f"lmdb://{self.dir / 'registry'}"

    def _load(self) -> dict:
        path = self.dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise SandboxError(f"{path}: unreadable sandbox state: {e}") from None
        hosts = state.get("hosts", []) if isinstance(state, dict) else None
        if not isinstance(hosts, list) or not all(
            isinstance(h, dict) and isinstance(h.get("id"), str)
            and all(isinstance(h.get(k), int) and not isinstance(h.get(k), bool)
                    for k in ("nbd_port", "peer_port"))
            and isinstance(h.get("pid", 0), int)
            for h in hosts
        ):
            raise SandboxError(f"{path}: unreadable sandbox state: not a vbp sandbox state file")
        return state

    def _save(self, state: dict) -> None:
        tmp = self.dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.dir / STATE_FILE)

    def hosts(self) -> list[SandboxHost]:
        state = self._load()
        out = []
        for h in state.get("hosts", []):
            host = SandboxHost(h["id"], h["nbd_port"], h["peer_port"], h.get("pid", 0))
            host.alive = pid_alive(host.pid)
            out.append(host)
        return out

    def up(self, n: int, base_port: int | None = None, capacity: str | None = None,
           timeout: float = 30.0, settings: dict | None = None,
           registry: str | None = None) -> list[SandboxHost]:
        """Start the hosts that are not running. `settings` (blockd config keys, e.g.
        {"lease_ttl": 4}) go into each host's blockd.toml and stay for later `up`s.
        `capacity`: of the hosts started now, remembered for each; None: a host started
        before keeps the one it had (a host back with another capacity is a change of
        data set, which moves chunks), a new one gets DEFAULT_CAPACITY.
        `registry` (a registry URL) replaces the embedded one; it cannot change while
        hosts of the sandbox run on another."""
        if not 1 <= n <= 64:
            raise InvalidArgument(f"--hosts must be between 1 and 64, not {n}")
        self.dir.mkdir(parents=True, exist_ok=True)
        state = self._load()
        known = {h["id"]: h for h in state.get("hosts", [])}
        if base_port and known and state.get("base_port", base_port) != base_port:
            # (its hosts keep the ports they were given: the new base would be recorded
            # and do nothing for them)
            raise InvalidArgument(
                f"--base-port {base_port}: the hosts of the sandbox in {self.dir} have their "
                f"ports from {state['base_port']}, which they keep; leave it out, or use "
                f"another --dir")
        base = base_port or state.get("base_port") or DEFAULT_BASE_PORT
        if not 1 <= base <= 65535 - 2 * n:
            raise InvalidArgument(f"--base-port {base} leaves no room for {n} hosts")
        state["base_port"] = base
        old = state.get("registry") or self.default_registry_url
        if registry:
            from vbp.registry import open_registry

            open_registry(registry).close()  # a malformed URL is refused before anything starts
            if registry != old and any(pid_alive(h.get("pid", 0)) for h in known.values()):
                raise SandboxError(
                    f"hosts of this sandbox run on registry {old}; stop them (vbp sandbox down) "
                    f"before moving the sandbox to {registry}")
        state["registry"] = registry or old
        saved = state.get("settings", {})
        if settings:
            state["settings"] = {**saved, **settings}
        hosts = []
        for i in range(1, n + 1):
            hid = f"host{i}"
            h = known.get(hid) or {"id": hid, "nbd_port": base + 2 * (i - 1), "peer_port": base + 2 * (i - 1) + 1}
            hosts.append(h)
        extra = [h for hid, h in known.items() if hid not in {x["id"] for x in hosts}]
        state["hosts"] = hosts + extra
        # before anything is saved or started: a bad value kept in the state would fail
        # every later `up` the same way
        self._check_settings(saved, settings or {}, hosts[0], capacity or DEFAULT_CAPACITY,
                             state["registry"], len(hosts))
        started = []
        for h in hosts:
            if pid_alive(h.get("pid", 0)):
                continue
            if not ports_free((h["nbd_port"], h["peer_port"])):
                raise SandboxError(
                    f"ports {h['nbd_port']}/{h['peer_port']} for {h['id']} are in use; "
                    f"choose another --base-port"
                )
            h["capacity"] = capacity or h.get("capacity") or DEFAULT_CAPACITY
            h["pid"] = self._spawn(h, h["capacity"], state.get("settings", {}), state["registry"])
            started.append(h)
        self._save(state)
        deadline = time.monotonic() + timeout
        self._wait_ready(started, timeout)
        self._wait_placed([h["id"] for h in started], max(1.0, deadline - time.monotonic()))
        return self.hosts()

    def _wait_placed(self, ids: list[str], timeout: float) -> None:
        """Hosts serve at once, but chunks are placed on them only once the controller has
        put them in the data set (replicator.migration): wait for that, so that a volume
        created right after `up` is spread over every host."""
        from vbp.registry import open_registry

        if not ids:
            return
        deadline = time.monotonic() + timeout
        with open_registry(self.registry_url) as reg:
            while True:
                m = reg.cluster_map()
                # a draining host stays out of the data set: nothing to wait for
                want = {i for i in ids if m.host(i) is None or m.host(i).state != "draining"}
                if m.data is not None and want <= set(m.data):
                    return
                if time.monotonic() > deadline:
                    raise SandboxError(f"{', '.join(ids)} not in the data set after {timeout:.0f}s "
                                       f"(data set: {', '.join(m.data_set)})")
                time.sleep(0.1)

    def _check_settings(self, saved: dict, new: dict, h: dict, capacity: str,
                        registry: str, n: int = 1) -> None:
        """Refuse settings that blockd would refuse, or never see, naming where they come
        from (`new`: --set; `saved`: the state file), the key and the reason. They are
        checked as host `h` reads them: its blockd.toml (_config_text) under its flags.
        A --set the command line gave is bad usage (BadValue: exit 2, as an unknown key
        is); the saved settings, checked alone first, are the state file's (InvalidArgument,
        naming it: a file they name that is gone since, say), and a flag's (--capacity)
        stays the flag's. Which is which is the SettingError's source."""
        if new and saved:
            self._check_merged(saved, {}, h, capacity, registry, n)
        try:
            self._check_merged(saved, new, h, capacity, registry, n)
        except SettingError as e:
            if new and e.source == SET:
                raise BadValue(str(e)) from None
            raise

    def _check_merged(self, saved: dict, new: dict, h: dict, capacity: str,
                      registry: str, n: int) -> None:
        file = f"{self.dir / STATE_FILE} settings"
        merged = {**saved, **new}
        for key, value in merged.items():
            source = SET if key in new else file
            if key.replace("-", "_") in SPAWN_KEYS:
                flag = {"capacity": "; use --capacity", "registry": "; use --registry"}.get(key, "")
                raise SettingError(source, f"key {key!r}: the sandbox sets it for each "
                                   f"host{flag}")
            try:
                (parsed,) = tomllib.loads(_config_text({key: value})).values()
            except ValueError:
                raise SettingError(source, f"key {key!r}: bad value {json.dumps(value)} "
                                   f"(not a TOML value)") from None
            coerce_setting(key, parsed, source)
            if key.replace("-", "_") == "metrics" and parsed and n > 1 \
                    and parse_hostport(parsed, "metrics")[1] != 0:
                # every host gets the setting: one port cannot be every host's
                raise SettingError(source, f"key {key!r}: {parsed} would be the metrics "
                                   f"address of each of the {n} hosts; give port 0 (each "
                                   f"host picks one) or run one host")
        # and together (nearfull_ratio at most full_ratio, TLS keys), with the flags
        from_settings(tomllib.loads(_config_text(merged)), self._flags(h, capacity, registry),
                      SET if new else file)

    def _flags(self, h: dict, capacity: str, registry: str) -> dict[str, str]:
        """The settings host `h` gets as blockd flags (SPAWN_KEYS)."""
        return {"host_id": h["id"], "data_dir": str(self.dir / h["id"] / "data"),
                "registry": registry, "listen": f"127.0.0.1:{h['peer_port']}",
                "nbd": f"127.0.0.1:{h['nbd_port']}", "capacity": capacity, "zone": "zone0",
                "pod": f"pod{h['id'][4:]}"}

    def _spawn(self, h: dict, capacity: str, settings: dict, registry: str) -> int:
        hdir = self.dir / h["id"]
        hdir.mkdir(parents=True, exist_ok=True)
        conf = hdir / "blockd.toml"
        conf.write_text(_config_text(settings))
        log = open(hdir / "blockd.log", "ab")
        cmd = [sys.executable, "-m", "blockd.main"]
        for key, value in self._flags(h, capacity, registry).items():
            cmd += ["--" + key.replace("_", "-"), value]
        cmd += ["--config", str(conf)]
        # Ctrl-C and SIGTERM wait until the child is blockd: one landing while Popen waits
        # for the exec makes Popen forget the child, and `down` (looking in /proc for
        # blockd command lines) would miss it for the moment it was not blockd yet. The
        # child inherits the mask through the exec; blockd.main unblocks it.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True)
            self._procs[proc.pid] = proc
            self._ids[proc.pid] = h["id"]
        finally:
            log.close()
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        return proc.pid

    def _wait_ready(self, hosts: list[dict], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(hosts)
        while pending:
            for h in list(pending):
                if port_open(h["nbd_port"]):
                    pending.remove(h)
                elif self._procs[h["pid"]].poll() is not None:
                    raise SandboxError(f"{h['id']} exited at start:\n{self.log_tail(h['id'])}")
            if pending and time.monotonic() > deadline:
                raise SandboxError(
                    f"{', '.join(h['id'] for h in pending)} not ready after {timeout:.0f}s:\n"
                    + self.log_tail(pending[0]["id"])
                )
            if pending:
                time.sleep(0.1)

    def log_tail(self, host_id: str, lines: int = 15) -> str:
        try:
            text = (self.dir / host_id / "blockd.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, host_id: str, sig: int = signal.SIGKILL) -> None:
        for h in self.hosts():
            if h.id == host_id and h.alive:
                os.kill(h.pid, sig)
                return
        raise SandboxError(f"no running sandbox host {host_id!r}")

    def _blockds(self) -> dict[int, str]:
        """pid -> host id of every running blockd whose data directory is in this sandbox,
        found in /proc. A signal can interrupt `up` between starting a host and saving its
        pid (inside subprocess.Popen even, which then forgets the child); the command line
        still says whose it is."""
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not any(b"blockd" in a for a in argv) or b"--data-dir" not in argv[:-1]:
                continue
            args = [a.decode(errors="replace") for a in argv]
            data_dir = Path(args[args.index("--data-dir") + 1])
            host_id = args[args.index("--host-id") + 1] if "--host-id" in args[:-1] else "?"
            if data_dir.parent.parent == self.dir and pid_alive(int(entry.name)):
                out[int(entry.name)] = host_id
        return out

    def _alive(self, pid: int) -> bool:
        """pid_alive, or for a process this object started, whether it has not exited (its
        command line may not read as blockd yet; unreaped, its pid is not reused)."""
        proc = self._procs.get(pid)
        return proc.poll() is None if proc is not None else pid_alive(pid)

    def down(self, timeout: float = 15.0) -> list[str]:
        state = self._load()
        stopped = []
        live = [h for h in state.get("hosts", []) if self._alive(h.get("pid", 0))]
        # and those whose pid never reached the state file (an interrupted `up`)
        known = {h["pid"] for h in live}
        live += [{"id": hid, "pid": pid} for pid, hid in self._blockds().items() if pid not in known]
        # and the hosts this object started that /proc does not show as blockd: a process
        # whose exec has begun (Popen has returned) reads an empty command line until the
        # kernel has set up its arguments, and an interrupted `up` stops right then
        known = {h["pid"] for h in live}
        live += [{"id": self._ids[pid], "pid": pid} for pid, proc in self._procs.items()
                 if pid not in known and proc.poll() is None]
        for h in live:
            try:
                os.kill(h["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(self._alive(h["pid"]) for h in live) and time.monotonic() < deadline:
            time.sleep(0.1)
        for h in live:
            if self._alive(h["pid"]):
                try:
                    os.kill(h["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            stopped.append(h["id"])
        deadline = time.monotonic() + 5
        while any(self._alive(h["pid"]) for h in live) and time.monotonic() < deadline:
            time.sleep(0.05)
        for h in state.get("hosts", []):
            h["pid"] = 0
        if state:
            self._save(state)
        return stopped
