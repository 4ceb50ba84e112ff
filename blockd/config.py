"""blockd configuration: command-line flags over an optional TOML file.

Every flag has a key of the same name in the file (dashes or underscores); flags win.
An invalid file or value is refused at start with the file, the key and the reason.
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from nbd_frontend.handshake import TLS_MODES
from nbd_frontend.server import MAX_CONNECTIONS, SEND_TIMEOUT
from nbd_frontend.tls import TLSConfigError, check_tls, server_context
from replicator.migration import DOWN_OUT_INTERVAL, NEARFULL_RATIO
from vbp.errors import InvalidArgument
from vbp.layout import CHUNK_SIZE_MIN, SIZE_MAX, VOLUME_SIZE_MAX, format_size, limit_text, parse_size
from vbp.registry import refuse_in_process
from vbp.sockets import congestion_problem
from vbp.volume import check_name

DEFAULT_CONFIG = "/etc/vbp/blockd.toml"
AUTO = "auto"  # nbd_tcp_congestion's default (Config.nbd_congestion)
LOCAL_NBD_CONGESTION = "cubic"  # of NBD connections from this host unless the config says
PEER_CONGESTION = "cubic"  # the peer links' TCP congestion control unless the config says
HOT_CHUNKS_MAX = 65536  # 256 GiB of 4 MiB chunks to re-hash after a crash: more is a typo
NBD_CONNECTIONS_MAX = 1_000_000  # (each a file descriptor: more is a typo)
# the keys that are counts: (least, most, of what)
COUNTS = {"hot_chunks": (0, HOT_CHUNKS_MAX, "chunks"),
          "nbd_max_connections": (1, NBD_CONNECTIONS_MAX, "connections"),
          "nbd_max_connections_per_address": (0, NBD_CONNECTIONS_MAX, "connections")}
# far above any disk; a host's capacity is summed with others' and published in its stats
CAPACITY_MAX = VOLUME_SIZE_MAX
# The longest heartbeat and lease TTL, timeout and GC period: a host heard of once a day
# is not one a failover can wait for, and etcd refuses lease TTLs past 9e9 s (blockd
# exited 1 at its first heartbeat).
PERIOD_MAX = 86400.0
# The least of each period: a lease_ttl of 0.01 s failed writes with EIO (the lease ran
# out between its renewal and the write: "registry unreachable", wrongly), a heartbeat_ttl
# of 0.001 s kept an idle blockd at half a core (found by a review)
PERIOD_MIN = {"heartbeat_ttl": 0.5, "lease_ttl": 0.5, "peer_timeout": 0.5, "gc_interval": 0.1,
              "nbd_send_timeout": 0.5}
# the keys of seconds that take 0 too, and what 0 means
ZERO_MEANS = {"scrub_interval": "off", "down_out_interval": "at once"}


class SettingError(InvalidArgument):
    """A setting refused, its message led by where the value came from: `source`, a
    file, a flag (`flag --capacity`) or whatever the caller named (the sandbox's
    "--set"). A caller tells its sources apart by `source`, never by the message."""

    def __init__(self, source: str, message: str):
        super().__init__(f"{source}: {message}")
        self.source = source


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    if not sep or not host:
        raise InvalidArgument(f"{what} must be HOST:PORT, not {text!r}")
    try:
        p = int(port)
    except ValueError:
        raise InvalidArgument(f"{what} must be HOST:PORT, not {text!r}") from None
    if not 0 <= p <= 65535:
        raise InvalidArgument(f"{what}: port {p} is out of range")
    return host.strip("[]"), p


def _advertised(host: str, what: str) -> None:
    """`listen` and `nbd` are also the addresses the host record gives other hosts and
    clients (HostRecord.peer, .nbd): an unspecified one (0.0.0.0, ::) would send every
    peer to itself and every client to its own machine."""
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:  # (a host name)
        return
    if unspecified:
        raise InvalidArgument(
            f"{host} is no address another host or a client can reach, and {what} is also "
            f"the address this host gives them: give this host's own address")


PEER_SECRET_MIN, PEER_SECRET_MAX = 16, 4096  # bytes of a peer secret (peer_secret_file)


@dataclass(slots=True)
class Config:
    host_id: str = ""
    data_dir: str = ""
    registry: str = ""
    listen: str = "127.0.0.1:7800"
    nbd: str = "127.0.0.1:10809"
    zone: str = "zone0"
    pod: str = "pod0"
    capacity: int = 10 * 1024**3
    cluster: str = "vbp"
    heartbeat_ttl: float = 6.0
    lease_ttl: float = 10.0
    peer_timeout: float = 5.0
    gc_interval: float = 5.0
    recovery_rate: int = 64 * 1024**2  # bytes/s a host copies for resync and recovery; 0: unlimited
    full_ratio: float = 0.95  # above this share of capacity used, a host takes no new chunk copies
    # above this share used, the data-set controller lowers the host's placement weight
    # (replicator.migration.wanted_weights); at most full_ratio. Unset: 0.85, or full_ratio
    # if that is lower (lowering full_ratio alone is not a mistake)
    nearfull_ratio: float | None = None
    scrub_interval: float = 86400.0  # seconds between background scrub passes; 0: off
    # seconds a down host stays in the data set, its chunks degraded, before the controller
    # (if this host is it) takes it out and recovery copies them elsewhere; 0: at once
    down_out_interval: float = DOWN_OUT_INTERVAL
    scrub_rate: int = 32 * 1024**2  # bytes per second scrub may verify; 0: unlimited
    # chunks that keep their dirty mark through a flush (vbp.chunkstore.HOT_MAX; DRBD's
    # al-extents): more spares more writes a synced index commit, and costs a crash more
    # chunks to re-hash and resync
    hot_chunks: int = 256
    metrics: str = ""  # HOST:PORT of the Prometheus endpoint; empty: off
    # TCP congestion control of the peer links (vbp.sockets: BBR's pacing slows large
    # replicated writes); "": the system's. Unset: cubic if this process may use it, else
    # the system's
    peer_tcp_congestion: str | None = None
    # of the NBD connections; "": the system's. "auto": the system's, except cubic (if this
    # process may use it) for clients on this host (nbd_congestion)
    nbd_tcp_congestion: str = AUTO
    # TLS on the NBD port (NBD_OPT_STARTTLS): "off", "on" (clients choose) or "require";
    # the server's PEM certificate chain and key, and a CA whose signature client
    # certificates must carry ("": any client, no certificate asked)
    nbd_tls: str = "off"
    nbd_tls_cert: str = ""
    nbd_tls_key: str = ""
    nbd_tls_ca: str = ""
    # seconds an NBD client may take none of its replies before it is disconnected and
    # what was queued for it freed (nbd_frontend.server.SEND_TIMEOUT)
    nbd_send_timeout: float = SEND_TIMEOUT
    # NBD connections served at once; one more is closed at once
    # (nbd_frontend.server.MAX_CONNECTIONS)
    nbd_max_connections: int = MAX_CONNECTIONS
    # of them from one client address; 0: half of nbd_max_connections (at least 1)
    nbd_max_connections_per_address: int = 0
    # a file holding the pool's peer secret, the same on every host: peers then prove to
    # each other that they know it before anything is served (replicator.transport, peer
    # authentication); "": none, any client that names the cluster is a peer
    peer_secret_file: str = ""
    log_level: str = "info"
    log_format: str = "kv"

    def validate(self, source: str = "flags", flagged=frozenset()) -> "Config":
        """Check the settings together; a value a flag gave (a key in `flagged`) is named
        as that flag's, the others as `source`'s (the file)."""
        def where(key: str) -> str:
            return _flag(key) if key in flagged else source

        for key in ("host_id", "data_dir", "registry"):
            if not getattr(self, key):
                raise SettingError(source, f"{key.replace('_', '-')} is required")
        # names that go into registry keys, failure domains (zone/pod/host), log lines and
        # tables: the rule of volume names (a newline in one forged a log line)
        for key in ("host_id", "zone", "pod", "cluster"):
            try:
                check_name(getattr(self, key), key.removesuffix("_id"))
            except InvalidArgument as e:
                raise SettingError(where(key), f"key {key!r}: {e}") from None
        for key in ("listen", "nbd"):
            try:
                host, _ = parse_hostport(getattr(self, key), key)
                _advertised(host, key)
            except InvalidArgument as e:
                raise SettingError(where(key), f"key {key!r}: {e}") from None
        if self.listen == self.nbd and not self.listen.endswith(":0"):
            raise SettingError(where('nbd'), f"keys 'listen' and 'nbd' are the same "
                               f"address, {self.nbd}: the peer protocol and NBD need a "
                               "port each")
        try:
            refuse_in_process(self.registry)
        except InvalidArgument as e:
            raise SettingError(where('registry'), f"key 'registry': {e}") from None
        lmdb_dir = self.registry[len("lmdb://"):] if self.registry.startswith("lmdb://") else ""
        for key, path in (("data_dir", self.data_dir), ("registry", lmdb_dir)):
            blocker = _not_a_directory(path) if path else None
            if blocker:
                raise SettingError(where(key), f"key {key!r}: {blocker} is not a directory")
        if not 0 < self.capacity <= CAPACITY_MAX:
            raise SettingError(where('capacity'), f"key 'capacity': must be greater than zero and at "
                               f"most {limit_text(CAPACITY_MAX)}")
        if self.capacity < CHUNK_SIZE_MIN:  # (a TOML integer is bytes: capacity = 5 is 5 bytes)
            raise SettingError(where('capacity'), f"key 'capacity': {self.capacity} bytes "
                               f"is less than the smallest chunk, "
                               f"{format_size(CHUNK_SIZE_MIN)} (a size: \"100G\")")
        for key, least in PERIOD_MIN.items():
            v = getattr(self, key)
            if not math.isfinite(v) or v <= 0:
                raise SettingError(source, f"key {key!r}: must be a positive finite number of seconds")
            if v < least:
                raise SettingError(source, f"key {key!r}: must be at least {least:g} "
                                   f"seconds")
            if v > PERIOD_MAX:
                raise SettingError(source, f"key {key!r}: must be at most {PERIOD_MAX:.0f} "
                                   f"seconds (a day)")
        for key, zero in ZERO_MEANS.items():
            v = getattr(self, key)
            if not math.isfinite(v) or v < 0:
                raise SettingError(source, f"key {key!r}: must be a finite number of "
                                   f"seconds, 0 ({zero}) or more")
        if not 0 < self.full_ratio <= 1:
            raise SettingError(source, "key 'full_ratio': must be above 0 and at most 1")
        if self.nearfull_ratio is None:
            self.nearfull_ratio = min(NEARFULL_RATIO, self.full_ratio)
        if not 0 < self.nearfull_ratio <= self.full_ratio:
            raise SettingError(source, f"key 'nearfull_ratio': must be above 0 and at most "
                               f"full_ratio ({self.full_ratio})")
        if self.scrub_rate < 0:
            raise SettingError(source, "key 'scrub_rate': must be 0 (unlimited) or more")
        for key, (low, high, _) in COUNTS.items():
            if not low <= getattr(self, key) <= high:
                raise SettingError(source, f"key {key!r}: must be from {low} to {high}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingError(where('log_level'), "key 'log_level': must be debug, info, warning or error")
        if self.log_format not in ("kv", "json"):
            raise SettingError(where('log_format'), "key 'log_format': must be kv or json")
        if self.peer_tcp_congestion is None:  # (a default that never stops a start)
            self.peer_tcp_congestion = _usable_or_system(PEER_CONGESTION)
        for key in ("peer_tcp_congestion", "nbd_tcp_congestion"):
            if key == "nbd_tcp_congestion" and self.nbd_tcp_congestion == AUTO:
                continue  # (its default, resolved by nbd_congestion; no name of the kernel's)
            problem = congestion_problem(getattr(self, key))
            if problem:
                raise SettingError(source, f"key {key!r}: {problem}")
        self.tls_context(source)  # (refused now, not at the first client)
        self.peer_secret(where("peer_secret_file"))  # (likewise)
        return self

    def nbd_max_per_address(self) -> int:
        """The NBD connections one client address may hold at once."""
        return self.nbd_max_connections_per_address or max(1, self.nbd_max_connections // 2)

    def peer_secret(self, source: str = "config") -> bytes:
        """The pool's peer secret from peer_secret_file (b"" when unset): its bytes, a
        final line break left out. InvalidArgument naming the key when the file cannot
        be read, holds fewer than PEER_SECRET_MIN bytes, or may be read by other users
        (it lets whoever holds it into the pool)."""
        path = self.peer_secret_file
        if not path:
            return b""
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                secret = f.read(PEER_SECRET_MAX + 1)
        except OSError as e:
            raise SettingError(source, f"key 'peer_secret_file': {path}: "
                               f"{e.strerror or e}") from None
        if not stat.S_ISREG(mode):
            raise SettingError(source, f"key 'peer_secret_file': {path}: not a file")
        if mode & 0o077:
            raise SettingError(source, f"key 'peer_secret_file': {path} may be read by "
                               f"other users (mode {stat.S_IMODE(mode):o}): chmod 600 it")
        secret = secret.rstrip(b"\r\n")
        if not PEER_SECRET_MIN <= len(secret) <= PEER_SECRET_MAX:
            raise SettingError(
                source, f"key 'peer_secret_file': {path} holds {len(secret)} bytes; a "
                f"secret takes {PEER_SECRET_MIN} to {PEER_SECRET_MAX} (e.g. `head -c 32 "
                f"/dev/urandom | base64 > {path}`)")
        return secret

    def nbd_congestion(self) -> tuple[str, str]:
        """(congestion control of the NBD connections, that of those from this host: "" when
        no other). A name (or "") in nbd_tcp_congestion is both. With "auto", the default,
        the connections keep the system's choice, but those from this host get cubic: a
        hypervisor attaching to its own host has no network to share, and BBR, a common
        default, paces every connection with timers (when the interface's qdisc is not fq),
        which on loopback only costs CPU."""
        if self.nbd_tcp_congestion != AUTO:
            return self.nbd_tcp_congestion, ""
        return "", _usable_or_system(LOCAL_NBD_CONGESTION)

    def tls_context(self, source: str = "config"):
        """The NBD port's ssl.SSLContext, None with nbd_tls off; InvalidArgument naming
        the key when the settings do not go together or a file does not load."""
        if self.nbd_tls not in TLS_MODES:
            raise SettingError(source, "key 'nbd_tls': must be off, on or require, "
                               f"not {self.nbd_tls!r}")
        if self.nbd_tls == "off":
            for key in ("nbd_tls_cert", "nbd_tls_key", "nbd_tls_ca"):
                if getattr(self, key):  # (a certificate given and no TLS: not silently)
                    raise SettingError(source, f"key {key!r}: set, but nbd_tls is "
                                       "off: set nbd_tls to on or require, or remove it")
            return None
        try:
            ctx = server_context(self.nbd_tls_cert, self.nbd_tls_key, self.nbd_tls_ca)
        except TLSConfigError as e:
            raise SettingError(source, f"key 'nbd_tls_{e.which}': {e} "
                               f"(nbd_tls is {self.nbd_tls})") from None
        try:  # (the mode is known and there is a context: only a CA can be refused here)
            check_tls(self.nbd_tls, ctx)
        except ValueError as e:
            raise SettingError(source, f"key 'nbd_tls_ca': {e}") from None
        return ctx


def _not_a_directory(path: str) -> str | None:
    """The nearest of `path` and its parents that exists, if it is not a directory: then
    blockd can neither create nor use `path`, and no restart changes that (say so at load,
    as a bad setting, rather than as an error of the first file operation)."""
    p = Path(path).absolute()
    for q in (p, *p.parents):
        try:
            if q.exists():
                return None if q.is_dir() else str(q)
        except OSError:  # (unreadable: the start tells)
            return None
    return None


def _usable_or_system(name: str) -> str:
    """Congestion control `name` if this process may give it to a socket, else "" (the
    system's): for defaults, which never stop a start."""
    return "" if congestion_problem(name) else name


_TYPES = {f.name: f.type for f in fields(Config)}


def _coerce(key: str, value, source: str):
    kind = _TYPES[key]

    def bad(reason: str):
        return SettingError(source, f"key {key!r}: bad value {value!r} ({reason})")

    if key in ("capacity", "recovery_rate", "scrub_rate"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise bad("expected a size such as 100G")
        if key == "recovery_rate" and value in (0, "0"):
            return 0
        try:
            return parse_size(value, CAPACITY_MAX if key == "capacity" else SIZE_MAX)
        except InvalidArgument as e:
            raise bad(str(e)) from None
    if key in COUNTS:
        low, high, what = COUNTS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad(f"expected a number of {what} from {low} to {high}")
        return value
    if key in ("full_ratio", "nearfull_ratio"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise bad("expected a fraction above 0 and at most 1, such as 0.95")
        return float(value)
    if kind == "float":
        if isinstance(value, bool):
            raise bad("expected a number of seconds")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad("expected a number of seconds") from None
        except OverflowError:  # (a TOML integer has any number of digits)
            raise bad("must be a positive finite number of seconds") from None
        zero = ZERO_MEANS.get(key)
        if zero and f == 0:
            return f  # off; at once
        if not math.isfinite(f) or f <= 0:
            raise bad(f"must be a finite number of seconds, 0 ({zero}) or more" if zero
                      else "must be a positive finite number of seconds")
        return f
    if kind == "str" and not isinstance(value, str):
        raise bad("expected a string")
    if isinstance(value, str) and "\x00" in value:  # (TOML's \u0000: no path or address holds one)
        raise bad("contains a NUL character")
    if key in ("listen", "nbd", "metrics") and value:
        try:
            parse_hostport(value, key)
        except InvalidArgument as e:
            raise bad(str(e)) from None
    return value


def load(path: str | None, overrides: dict) -> Config:
    """Read the TOML file (if any), apply non-None overrides, validate."""
    file = path or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    if not file:
        return from_settings({}, overrides, "flags")
    try:
        data = tomllib.loads(Path(file).read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"{file}: config file not found") from None
    # (ValueError, of which both are kinds: tomllib raises it bare for an integer of
    # more digits than int() takes)
    except ValueError as e:
        raise InvalidArgument(f"{file}: not valid TOML: {e}") from None
    except OSError as e:
        raise InvalidArgument(f"{file}: cannot read: {e.strerror}") from None
    return from_settings(data, overrides, file)


def coerce_setting(raw_key: str, value, source: str):
    """One setting as the TOML file gives it (from `source`), checked on its own (not
    against the others: Config.validate does that); its value in Config."""
    key = raw_key.replace("-", "_")
    if key not in _TYPES:
        raise SettingError(source, f"unknown key {raw_key!r}")
    return _coerce(key, value, source)


def _flag(key: str) -> str:
    """A setting's flag, as errors name it: flag --data-dir."""
    return "flag --" + key.replace("_", "-")


def from_settings(data: dict, overrides: dict, source: str) -> Config:
    """The config of the settings `data` (keys and values as in the TOML file, read from
    `source`) with the non-None `overrides` (flags) over them, validated."""
    cfg = Config()
    given: dict[str, str] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in given:  # (TOML refuses a key twice, but not its two spellings)
            raise SettingError(source, f"key {raw_key!r} is key {given[key]!r} again")
        given[key] = raw_key
        setattr(cfg, key, coerce_setting(raw_key, value, source))
    flagged = set()
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, _coerce(key, value, _flag(key)))
            flagged.add(key)
    return cfg.validate(source, frozenset(flagged))
