"""blockd.config: flags over a TOML file; every mistake refused with the file, the key and
the reason; and the real `blockd` process saying so in one line."""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trustme

from blockd.config import Config, load
from vbp.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = 'host_id = "h1"\ndata_dir = "/tmp/vbp-h1"\nregistry = "lmdb:///tmp/vbp-reg"\n'


def _tls_files() -> Path:
    """A CA, and a server certificate and key it signed, as PEM files (the TLS keys name
    files that must load)."""
    d = Path(tempfile.mkdtemp(prefix="vbp-config-tls-"))
    atexit.register(shutil.rmtree, d, True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    cert.private_key_pem.write_to_path(str(d / "server.key"))
    return d


TLS = _tls_files()
SECRET = TLS / "peer.secret"  # (the peer secret beside them, mode 600)
SECRET.write_bytes(b"0123456789abcdef0123456789abcdef\n")
SECRET.chmod(0o600)

# one valid value per key, as TOML, with the value load() must produce
VALUES = {
    "host_id": ('"h7"', "h7"),
    "data_dir": ('"/srv/vbp/h7"', "/srv/vbp/h7"),
    "registry": ('"etcd://10.0.0.1:2379,10.0.0.2:2379"', "etcd://10.0.0.1:2379,10.0.0.2:2379"),
    "listen": ('"10.0.0.7:7900"', "10.0.0.7:7900"),
    "nbd": ('"[::1]:10810"', "[::1]:10810"),
    "zone": ('"eu-west"', "eu-west"),
    "pod": ('"rack9"', "rack9"),
    "capacity": ('"2T"', 2 * 1024**4),
    "cluster": ('"prod"', "prod"),
    "heartbeat_ttl": ("9", 9.0),
    "lease_ttl": ("12.5", 12.5),
    "peer_timeout": ("2.5", 2.5),
    "gc_interval": ("30", 30.0),
    "recovery_rate": ('"16M"', 16 * 1024**2),
    "full_ratio": ("0.9", 0.9),
    "nearfull_ratio": ("0.8", 0.8),
    "scrub_interval": ("3600", 3600.0),
    "down_out_interval": ("120", 120.0),
    "scrub_rate": ('"100M"', 100 * 1024**2),
    "hot_chunks": ("1024", 1024),
    "metrics": ('"127.0.0.1:9810"', "127.0.0.1:9810"),
    "peer_tcp_congestion": ('"reno"', "reno"),
    "nbd_tcp_congestion": ('"reno"', "reno"),
    "nbd_tls": ('"require"', "require"),
    "nbd_tls_cert": (f'"{TLS}/server.pem"', f"{TLS}/server.pem"),
    "nbd_tls_key": (f'"{TLS}/server.key"', f"{TLS}/server.key"),
    "nbd_tls_ca": (f'"{TLS}/ca.pem"', f"{TLS}/ca.pem"),
    "nbd_send_timeout": ("20", 20.0),
    "nbd_max_connections": ("64", 64),
    "nbd_max_connections_per_address": ("16", 16),
    "peer_secret_file": (f'"{SECRET}"', str(SECRET)),
    "log_level": ('"debug"', "debug"),
    "log_format": ('"json"', "json"),
}


# keys that are only valid together: a test of one alone writes the others too
TOGETHER = [("nbd_tls", "nbd_tls_cert", "nbd_tls_key", "nbd_tls_ca")]


def companions(key: str) -> str:
    for group in TOGETHER:
        if key in group:
            return "".join(f"{k} = {VALUES[k][0]}\n" for k in group if k != key)
    return ""


def write(tmp_path, text: str, name: str = "blockd.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def refused(path, overrides=None) -> str:
    with pytest.raises(InvalidArgument) as e:
        load(path, overrides or {})
    msg = str(e.value)
    assert "\n" not in msg.strip(), msg
    return msg


def names_key(msg: str, key: str) -> bool:
    return key in msg or key.replace("_", "-") in msg


def test_every_config_field_has_a_test_value():
    assert set(VALUES) == {f.name for f in dataclasses.fields(Config)}


@pytest.mark.parametrize("dashes", [False, True], ids=["underscores", "dashes"])
def test_every_key_is_read_from_the_file(tmp_path, dashes):
    lines = [f"{k.replace('_', '-') if dashes else k} = {v[0]}" for k, v in VALUES.items()]
    cfg = load(write(tmp_path, "\n".join(lines)), {})
    for key, (_, value) in VALUES.items():
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize("key", sorted(VALUES))
def test_each_key_alone_with_dashes(tmp_path, key):
    text = "\n".join(line for line in REQUIRED.splitlines() if not line.startswith(key + " "))
    cfg = load(write(tmp_path, f"{text}\n{companions(key)}{key.replace('_', '-')} = "
                                f"{VALUES[key][0]}\n"), {})
    assert getattr(cfg, key) == VALUES[key][1]


def test_flags_override_the_file(tmp_path):
    path = write(tmp_path, "\n".join(f"{k} = {v[0]}" for k, v in VALUES.items()))
    flags = {"host_id": "h9", "data_dir": "/d9", "registry": "lmdb:///r9", "listen": "127.0.0.1:1",
             "nbd": "127.0.0.1:2", "zone": "z9", "pod": "p9", "capacity": "3G", "cluster": "c9",
             "heartbeat_ttl": "4", "lease_ttl": 8, "peer_timeout": "1.5", "gc_interval": 60,
             "recovery_rate": "0", "full_ratio": 0.8, "nearfull_ratio": 0.7, "log_level": "error", "log_format": "kv", "metrics": "127.0.0.1:3",
             "scrub_interval": 0, "scrub_rate": "1M", "hot_chunks": 0, "peer_tcp_congestion": "",
             "down_out_interval": 0,
             "nbd_tcp_congestion": "cubic", "nbd_tls": "on", "nbd_tls_cert": str(TLS / "server.pem"),
             "nbd_tls_key": str(TLS / "server.key"), "nbd_tls_ca": "", "nbd_send_timeout": "7",
             "nbd_max_connections": 9, "nbd_max_connections_per_address": 3, "peer_secret_file": ""}
    assert set(flags) == set(VALUES)
    cfg = load(path, flags)
    assert cfg.host_id == "h9" and cfg.data_dir == "/d9" and cfg.registry == "lmdb:///r9"
    assert (cfg.listen, cfg.nbd, cfg.zone, cfg.pod, cfg.cluster) == ("127.0.0.1:1", "127.0.0.1:2", "z9", "p9", "c9")
    assert cfg.capacity == 3 * 1024**3 and cfg.recovery_rate == 0 and cfg.full_ratio == 0.8
    assert cfg.nearfull_ratio == 0.7
    assert (cfg.heartbeat_ttl, cfg.lease_ttl, cfg.peer_timeout, cfg.gc_interval) == (4.0, 8.0, 1.5, 60.0)
    assert (cfg.log_level, cfg.log_format, cfg.metrics) == ("error", "kv", "127.0.0.1:3")
    assert (cfg.scrub_interval, cfg.scrub_rate, cfg.hot_chunks) == (0.0, 1024**2, 0)
    assert cfg.down_out_interval == 0.0
    assert (cfg.peer_tcp_congestion, cfg.nbd_tcp_congestion) == ("", "cubic")
    assert (cfg.nbd_tls, cfg.nbd_tls_ca, cfg.nbd_send_timeout) == ("on", "", 7.0)
    assert cfg.nbd_max_connections == 9 and cfg.peer_secret_file == ""
    assert cfg.nbd_max_connections_per_address == 3 == cfg.nbd_max_per_address()


def test_nearfull_ratio_defaults_to_085_or_full_ratio_if_lower(tmp_path):
    assert load(write(tmp_path, REQUIRED), {}).nearfull_ratio == 0.85
    assert load(write(tmp_path, REQUIRED + "full_ratio = 0.5\n"), {}).nearfull_ratio == 0.5
    assert load(write(tmp_path, REQUIRED + "full_ratio = 0.5\nnearfull_ratio = 0.4\n"), {}).nearfull_ratio == 0.4


def test_flags_left_unset_keep_the_file_values(tmp_path):
    path = write(tmp_path, REQUIRED + 'zone = "z1"\n')
    cfg = load(path, {"zone": None, "pod": "p2", "host_id": None})
    assert (cfg.zone, cfg.pod, cfg.host_id) == ("z1", "p2", "h1")


def test_flags_alone_without_a_file():
    if os.path.exists("/etc/vbp/blockd.toml"):
        pytest.skip("this machine has /etc/vbp/blockd.toml, which load() reads by default")
    cfg = load(None, {"host_id": "h1", "data_dir": "/d", "registry": "lmdb:///r"})
    assert cfg.listen == Config().listen


def test_invalid_toml_names_the_file_and_the_line(tmp_path):
    path = write(tmp_path, REQUIRED + 'zone = "unterminated\n')
    msg = refused(path)
    assert path in msg and "not valid TOML" in msg and "line 4" in msg


def test_not_utf8_is_refused(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b'host_id = "\xff\xfe"\n')
    msg = refused(str(p))
    assert str(p) in msg and "TOML" in msg


def test_missing_file_and_directory_are_refused(tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert missing in refused(missing) and "not found" in refused(missing)
    msg = refused(str(tmp_path))
    assert str(tmp_path) in msg and "cannot read" in msg


@pytest.mark.parametrize("key", ["hostid", "data-directory", "Listen", "metrics_port"])
def test_unknown_key_is_refused(tmp_path, key):
    path = write(tmp_path, REQUIRED + f'{key} = "x"\n')
    msg = refused(path)
    assert path in msg and f"unknown key {key!r}" in msg


def test_a_key_in_both_spellings_is_refused(tmp_path):
    path = write(tmp_path, REQUIRED + "\nlease-ttl = 3\nlease_ttl = 4\n")
    msg = refused(path)
    assert path in msg and "'lease_ttl' is key 'lease-ttl' again" in msg


def test_python_m_blockd_is_the_blockd_command():
    p = subprocess.run([sys.executable, "-m", "blockd", "--help"], capture_output=True,
                       text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0 and "Serve this host's disk" in p.stdout, p.stderr


def test_the_peer_secret_is_read_from_its_file_and_bad_ones_are_refused(tmp_path):
    """peer_secret_file: the secret is the file's bytes less a final line break; a file
    that is missing, too short, or readable by others (the secret lets whoever holds it
    into the pool) is refused at load, naming the key."""
    cfg = load(write(tmp_path, REQUIRED + f'peer_secret_file = "{SECRET}"\n'), {})
    assert cfg.peer_secret() == b"0123456789abcdef0123456789abcdef"
    assert load(write(tmp_path, REQUIRED), {}).peer_secret() == b""
    short, loose = tmp_path / "short", tmp_path / "loose"
    short.write_bytes(b"tiny\n")
    short.chmod(0o600)
    loose.write_bytes(b"0123456789abcdef0123456789abcdef")
    loose.chmod(0o644)
    for path, reason in ((tmp_path / "missing", "No such file"), (short, "holds 4 bytes"),
                         (loose, "may be read by other users .mode 644.: chmod 600"),
                         (tmp_path, "not a file|Is a directory")):
        msg = refused(write(tmp_path, REQUIRED + f'peer_secret_file = "{path}"\n'))
        assert names_key(msg, "peer_secret_file") and re.search(reason, msg), msg


def test_a_table_is_refused(tmp_path):
    path = write(tmp_path, REQUIRED + "[nbd]\nport = 1\n")
    msg = refused(path)
    assert path in msg and "'nbd'" in msg


@pytest.mark.parametrize("key", ["host_id", "data_dir", "registry"])
def test_missing_required_key_is_refused(tmp_path, key):
    text = "\n".join(line for line in REQUIRED.splitlines() if not line.startswith(key))
    path = write(tmp_path, text)
    msg = refused(path)
    assert path in msg and names_key(msg, key) and "required" in msg


@pytest.mark.parametrize("key", ["host_id", "data_dir", "registry"])
def test_empty_required_key_is_refused(tmp_path, key):
    text = re.sub(rf'(?m)^{key} = .*$', f'{key} = ""', REQUIRED)
    path = write(tmp_path, text)
    msg = refused(path)
    assert path in msg and names_key(msg, key)


BAD_VALUES = [
    # key, TOML value, what the reason must say
    ("host_id", "5", r"string|type"),
    ("pod", "3", r"string|type"),
    ("zone", "[1, 2]", r"string|type"),
    # names go into registry keys, failure domains (zone/pod/host), log lines and tables
    ("host_id", '"evil\\nlevel=error fake=1"', r"invalid host name"),
    ("host_id", '"a/b c"', r"invalid host name"),
    ("host_id", '"-h1"', r"starting with a letter or digit"),
    ("host_id", '"' + "h" * 129 + '"', r"1-128 letters"),
    ("zone", '"a/b"', r"invalid zone name"),
    ("pod", '""', r"invalid pod name"),
    ("cluster", '""', r"invalid cluster name"),
    ("cluster", '"vbp prod"', r"invalid cluster name"),
    ("capacity", '"abc"', r"not a size"),
    ("capacity", "0", r"greater than zero"),
    ("capacity", "5", r"5 bytes is less than the smallest chunk, 1 MiB"),  # (an integer is bytes)
    ("listen", '"127.0.0.1:10809"', r"'listen' and 'nbd' are the same address"),
    ("capacity", '"-1G"', r"size|negative"),
    ("capacity", "true", r"size|type|bool"),
    ("capacity", '"99999999999999P"', r"too large.*at most 1152921504606846976 bytes, 1 EiB\)"),
    ("capacity", '"2048P"', r"at most 1152921504606846976 bytes, 1 EiB\)"),
    ("capacity", "9" * 4000, r"too large"),
    ("capacity", '"' + "9" * 5000 + '"', r"not a size"),
    ("recovery_rate", '"99999999999999999999999P"', r"too large"),
    ("scrub_rate", str(2**63), r"too large"),
    ("lease_ttl", '"x"', r"float|number"),
    ("lease_ttl", "true", r"number|type|bool"),
    ("heartbeat_ttl", "-1", r"positive"),
    ("heartbeat_ttl", "0", r"positive"),
    ("heartbeat_ttl", "nan", r"positive|finite|nan"),
    ("lease_ttl", "inf", r"finite|inf"),
    ("peer_timeout", "0", r"positive"),
    ("gc_interval", "-5", r"positive"),
    ("heartbeat_ttl", "1e10", r"at most 86400"),
    ("lease_ttl", "86401", r"at most 86400"),
    ("peer_timeout", "1e300", r"at most 86400"),
    ("nbd_send_timeout", "100000", r"at most 86400"),
    ("lease_ttl", "0.01", r"at least 0.5 seconds"),
    ("heartbeat_ttl", "0.001", r"at least 0.5 seconds"),
    ("peer_timeout", "0.4", r"at least 0.5 seconds"),
    ("gc_interval", "0.05", r"at least 0.1 seconds"),
    ("nbd_send_timeout", "0.1", r"at least 0.5 seconds"),
    ("recovery_rate", '"fast"', r"size"),
    ("full_ratio", "1.5", r"fraction"),
    ("full_ratio", "0", r"fraction"),
    ("full_ratio", '"95%"', r"fraction"),
    ("nearfull_ratio", "1.5", r"fraction"),
    ("nearfull_ratio", "0.97", r"at most full_ratio"),
    ("recovery_rate", "true", r"size"),
    ("listen", '"nope"', r"HOST:PORT"),
    ("listen", '"127.0.0.1:x"', r"HOST:PORT"),
    ("nbd", '"127.0.0.1:99999"', r"out of range"),
    # (also the addresses other hosts and clients are given: an unspecified one sends
    # every peer to itself)
    ("listen", '"0.0.0.0:7800"', r"no address another host or a client can reach"),
    ("nbd", '"[::]:10809"', r"give this host's own address"),
    ("log_level", '"loud"', r"debug, info"),
    ("log_format", '"xml"', r"kv or json"),
    ("peer_tcp_congestion", '"no_such_cc"', r"not available on this kernel"),
    ("nbd_tcp_congestion", '"a b"', r"not a congestion control name"),
    ("peer_tcp_congestion", "3", r"string"),
    ("peer_tcp_congestion", '"auto"', r"not available on this kernel"),  # (nbd's word only)
    ("nbd_tls", '"yes"', r"off, on or require"),
    ("nbd_tls", '"require"', r"certificate is needed"),
    ("nbd_tls_cert", f'"{TLS}/server.pem"', r"nbd_tls is off"),
    ("nbd_tls_ca", f'"{TLS}/ca.pem"', r"nbd_tls is off"),
]


def _tls_config(tmp_path, **over) -> str:
    keys = {"nbd_tls": '"require"', "nbd_tls_cert": f'"{TLS}/server.pem"',
            "nbd_tls_key": f'"{TLS}/server.key"', "nbd_tls_ca": f'"{TLS}/ca.pem"'}
    keys.update(over)
    return write(tmp_path, REQUIRED + "".join(f"{k} = {v}\n" for k, v in keys.items() if v))


def test_tls_keys_build_the_context(tmp_path):
    import ssl
    cfg = load(_tls_config(tmp_path), {})
    ctx = cfg.tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    cfg = load(_tls_config(tmp_path, nbd_tls_ca=None), {})
    assert cfg.tls_context().verify_mode == ssl.CERT_NONE  # (no CA: no client certificate)
    assert load(write(tmp_path, REQUIRED), {}).tls_context() is None


@pytest.mark.parametrize("key, content, reason", [
    ("nbd_tls_cert", b"not a certificate", r"holds no PEM certificate"),
    ("nbd_tls_key", b"not a key", r"holds no PEM private key"),
    ("nbd_tls_ca", b"not a CA", r"CA file .* holds no PEM certificate"),
    ("nbd_tls_cert", b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
     r"do not load"),
    ("nbd_tls_ca", b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
     r"CA file .* does not load"),
    ("nbd_tls_cert", None, r"cannot read .*No such file"),
    ("nbd_tls_key", None, r"cannot read .*No such file"),
    ("nbd_tls_ca", None, r"cannot read .*No such file"),
])
def test_a_tls_file_that_does_not_load_is_refused_naming_key_and_file(tmp_path, key, content,
                                                                      reason):
    bad = tmp_path / "bad.pem"
    if content is not None:
        bad.write_bytes(content)
    path = _tls_config(tmp_path, **{key: f'"{bad}"'})
    msg = refused(path)
    assert path in msg and names_key(msg, key) and str(bad) in msg, msg
    assert re.search(reason, msg), msg


def test_client_certificates_need_tls_required(tmp_path):
    """With TLS optional, a client in the clear would be served without a certificate."""
    msg = refused(_tls_config(tmp_path, nbd_tls='"on"'))
    assert names_key(msg, "nbd_tls_ca") and "require" in msg, msg


def test_an_encrypted_private_key_is_refused_without_asking_for_a_passphrase(tmp_path):
    from cryptography.hazmat.primitives import serialization

    cert = trustme.CA().issue_cert("127.0.0.1")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    (tmp_path / "enc.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    msg = refused(_tls_config(tmp_path, nbd_tls_cert=f'"{tmp_path}/c.pem"',
                              nbd_tls_key=f'"{tmp_path}/enc.key"'))
    assert names_key(msg, "nbd_tls_key") and "encrypted" in msg, msg


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path):
    other = trustme.CA().issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(tmp_path / "other.key"))
    msg = refused(_tls_config(tmp_path, nbd_tls_key=f'"{tmp_path}/other.key"'))
    assert names_key(msg, "nbd_tls_key") and "is not the one of the certificate" in msg, msg


# (ids the same in every process: a value naming a file under a temporary directory says
# "TMP" there, so that parallel workers collect the same tests)
@pytest.mark.parametrize("key, value, reason", BAD_VALUES,
                         ids=[f"{k}={v.replace(str(TLS), 'TMP')[:30]}" for k, v, _ in BAD_VALUES])
def test_bad_value_is_refused_with_file_key_and_reason(tmp_path, key, value, reason):
    text = "\n".join(line for line in REQUIRED.splitlines() if not line.startswith(key + " "))
    path = write(tmp_path, f"{text}\n{key} = {value}\n")
    msg = refused(path)
    assert path in msg, f"the file is not named: {msg!r}"
    assert names_key(msg, key), f"the key is not named: {msg!r}"
    assert re.search(reason, msg), f"the reason is not given: {msg!r}"
    assert "()" not in msg, f"empty reason: {msg!r}"


@pytest.mark.parametrize("key, value, reason", [
    ("capacity", "lots", r"not a size"),
    ("capacity", "99999999999999P", r"too large"),
    ("heartbeat_ttl", "soon", r"float|number"),
    ("listen", "nope", r"HOST:PORT"),
    ("nbd", "0.0.0.0:10809", r"this host's own address"),
])
def test_bad_flag_is_refused_naming_the_flag(tmp_path, key, value, reason):
    msg = refused(write(tmp_path, REQUIRED), {key: value})
    assert "--" + key.replace("_", "-") in msg and re.search(reason, msg), msg


# --- the real process --------------------------------------------------------------------


def run_blockd(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "blockd.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("text, expect", [
    (REQUIRED + "zone = \n", "not valid TOML"),
    (REQUIRED + 'colour = "blue"\n', "unknown key 'colour'"),
    ('data_dir = "/tmp/x"\nregistry = "lmdb:///tmp/r"\n', "host-id is required"),
    (REQUIRED + 'capacity = "lots"\n', "not a size"),
    (REQUIRED + 'capacity = "99999999999999P"\n', "too large"),
    (REQUIRED + "capacity = " + "9" * 5000 + "\n", "not valid TOML"),
], ids=["invalid-toml", "unknown-key", "missing-key", "bad-value", "huge-capacity", "huge-integer"])
def test_blockd_process_refuses_bad_config_in_one_line(tmp_path, text, expect):
    path = write(tmp_path, text, "bad.toml")
    p = run_blockd("--config", path)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("blockd: ") and path in lines[0] and expect in lines[0], lines[0]
    assert "Traceback" not in p.stderr + p.stdout and p.stdout == ""


def test_blockd_process_refuses_a_missing_config_file(tmp_path):
    p = run_blockd("--config", str(tmp_path / "absent.toml"))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "absent.toml" in p.stderr and "not found" in p.stderr


def _held_port(stack) -> int:
    """A loopback port another process (here: this one) listens on."""
    import socket

    s = stack.enter_context(socket.socket())
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s.getsockname()[1]


@pytest.mark.parametrize("case, code, expect", [
    ("listen-in-use", 2, "cannot listen on 127.0.0.1:{port} (peer protocol): Address already in use"),
    ("nbd-in-use", 2, "cannot listen on 127.0.0.1:{port} (NBD): Address already in use"),
    ("metrics-in-use", 2, "cannot listen on 127.0.0.1:{port} (metrics): Address already in use"),
    ("data-dir-under-a-file", 2, "key 'data_dir': {file} is not a directory"),
    ("lmdb-registry-a-file", 2, "key 'registry': {file} is not a directory"),
    ("registry-unreachable", 1, "registry etcd://127.0.0.1:{closed} is unreachable"),
    ("index-not-lmdb", 1, "chunk store {data}/chunks: cannot open its index: "),
    # (a path nothing can make: /proc takes no directory, ENOENT; said once)
    ("data-dir-not-makeable", 2, "data_dir /proc/vbp-test: cannot be made: No such file or directory"),
    ("lmdb-registry-not-makeable", 1,
     "cannot open LMDB at /proc/vbp-test: No such file or directory"),
])
def test_blockd_process_start_errors_are_one_line(tmp_path, case, code, expect):
    """An error at start (a port in use, a path that cannot be a directory, no registry)
    is one `blockd: ` line, not the traceback of the exception groups trio's nurseries
    wrap it in; 2 (no systemd restart) when the setting itself cannot work, 1 when it
    may come back (blockd.main)."""
    import contextlib

    file = tmp_path / "file"
    file.write_text("not a directory")
    if case == "index-not-lmdb":  # (a damaged disk: LMDB refuses the file at open)
        (tmp_path / "data" / "chunks" / "index").mkdir(parents=True)
        (tmp_path / "data" / "chunks" / "index" / "data.mdb").write_bytes(b"\x5a" * 65536)
    with contextlib.ExitStack() as stack:
        port, closed = _held_port(stack), _closed_port()
        args = {"--host-id": "h1", "--data-dir": str(tmp_path / "data"),
                "--registry": f"lmdb://{tmp_path}/reg", "--listen": "127.0.0.1:0",
                "--nbd": "127.0.0.1:0", "--log-level": "error"}
        args.update({
            "listen-in-use": {"--listen": f"127.0.0.1:{port}"},
            "nbd-in-use": {"--nbd": f"127.0.0.1:{port}"},
            "metrics-in-use": {"--metrics": f"127.0.0.1:{port}"},
            "data-dir-under-a-file": {"--data-dir": str(file / "data")},
            "lmdb-registry-a-file": {"--registry": f"lmdb://{file}"},
            "registry-unreachable": {"--registry": f"etcd://127.0.0.1:{closed}"},
            "index-not-lmdb": {},
            "data-dir-not-makeable": {"--data-dir": "/proc/vbp-test"},
            "lmdb-registry-not-makeable": {"--registry": "lmdb:///proc/vbp-test"},
        }[case])
        p = run_blockd(*[x for kv in args.items() for x in kv])
    expect = expect.format(port=port, closed=closed, file=file, data=tmp_path / "data")
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if not line.startswith("ts=")]  # (logs)
    assert lines == [lines[0]] and lines[0].startswith("blockd: ") and expect in lines[0], p.stderr
    assert p.returncode == code and p.stdout == "", p.stderr


def test_only_errors_for_the_operator_are_cut_to_one_line():
    """A bug anywhere in the group keeps its traceback (blockd.main re-raises)."""
    import errno

    from blockd.main import _exit_code, _operator_errors
    from vbp.errors import RegistryUnavailable

    busy = OSError(errno.EADDRINUSE, "in use")
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [busy])])
    assert _operator_errors(nested) == [busy] and _exit_code(busy) == 2
    gone = RegistryUnavailable("no etcd")
    assert _operator_errors(ExceptionGroup("g", [gone])) == [gone] and _exit_code(gone) == 1
    assert _exit_code(OSError(errno.EIO, "I/O error")) == 1
    assert _operator_errors(ExceptionGroup("g", [busy, KeyError("bug")])) is None
    assert _operator_errors(TypeError("bug")) is None


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_operator_guide_documents_every_key():
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    missing = [f.name for f in dataclasses.fields(Config) if f"`{f.name}`" not in guide]
    assert not missing, f"docs/operator-guide.md does not document {missing}"


def test_scrub_interval_zero_turns_it_off_and_negative_values_are_refused(tmp_path):
    cfg = load(write(tmp_path, REQUIRED + "scrub_interval = 0\nscrub_rate = 0\n"), {})
    assert cfg.scrub_interval == 0 and cfg.scrub_rate == 0
    assert names_key(refused(write(tmp_path, REQUIRED + "scrub_interval = -1\n", "a.toml")),
                     "scrub_interval")
    assert names_key(refused(write(tmp_path, REQUIRED + 'scrub_rate = "fast"\n', "b.toml")),
                     "scrub_rate")


def test_down_out_interval_defaults_to_ten_minutes_and_zero_means_at_once(tmp_path):
    assert load(write(tmp_path, REQUIRED), {}).down_out_interval == 600.0
    assert load(write(tmp_path, REQUIRED + "down_out_interval = 0\n"), {}).down_out_interval == 0
    for bad in ("-1", "nan", "inf", '"soon"', "true"):
        msg = refused(write(tmp_path, REQUIRED + f"down_out_interval = {bad}\n", "a.toml"))
        assert names_key(msg, "down_out_interval"), msg


@pytest.mark.parametrize("key,zero", [("down_out_interval", "at once"), ("scrub_interval", "off")])
def test_a_negative_interval_is_refused_saying_that_zero_is_taken(tmp_path, key, zero):
    """Both keys take 0 (the operator guide: `0`: at once; `0` turns the background scrub
    off): the refusal of a negative value must not tell the operator it must be positive."""
    for i, bad in enumerate(("-1", "-0.5", "nan")):
        msg = refused(write(tmp_path, f"{REQUIRED}{key} = {bad}\n", f"n{i}.toml"))
        assert names_key(msg, key) and "positive" not in msg and f"0 ({zero})" in msg, msg


def test_hot_chunks_is_a_count_of_chunks(tmp_path):
    assert load(write(tmp_path, REQUIRED), {}).hot_chunks == 256
    assert load(write(tmp_path, REQUIRED + "hot_chunks = 0\n"), {}).hot_chunks == 0
    for i, bad in enumerate(("-1", '"1G"', "true", "2.5", "65537")):
        path = write(tmp_path, REQUIRED + f"hot_chunks = {bad}\n", f"h{i}.toml")
        assert names_key(refused(path), "hot_chunks"), bad


def test_nbd_connections_per_address_are_half_the_whole_unless_set(tmp_path):
    cfg = load(write(tmp_path, REQUIRED), {})
    assert (cfg.nbd_max_connections_per_address, cfg.nbd_max_per_address()) == (0, 512)
    cfg = load(write(tmp_path, REQUIRED + "nbd_max_connections = 1\n", "one.toml"), {})
    assert cfg.nbd_max_per_address() == 1
    cfg = load(write(tmp_path, REQUIRED + "nbd_max_connections_per_address = 1024\n", "all.toml"), {})
    assert cfg.nbd_max_per_address() == 1024
    for i, bad in enumerate(("-1", '"many"', "2.5", "1000001")):
        path = write(tmp_path, REQUIRED + f"nbd_max_connections_per_address = {bad}\n", f"p{i}.toml")
        assert names_key(refused(path), "nbd_max_connections_per_address"), bad


def test_nbd_max_connections_is_a_count_of_connections(tmp_path):
    assert load(write(tmp_path, REQUIRED), {}).nbd_max_connections == 1024
    assert load(write(tmp_path, REQUIRED + "nbd_max_connections = 1\n"), {}).nbd_max_connections == 1
    for i, bad in enumerate(("0", "-1", '"many"', "true", "2.5", "1000001")):
        path = write(tmp_path, REQUIRED + f"nbd_max_connections = {bad}\n", f"n{i}.toml")
        assert names_key(refused(path), "nbd_max_connections"), bad


@pytest.mark.parametrize("key", ["heartbeat_ttl", "lease_ttl", "peer_timeout", "gc_interval",
                                 "scrub_interval", "down_out_interval"])
def test_a_number_of_seconds_too_large_for_a_float_is_refused(tmp_path, key):
    """TOML integers have any number of digits; float() of one past 1.8e308 raised
    OverflowError out of load (a traceback from blockd)."""
    msg = refused(write(tmp_path, f"{REQUIRED}{key} = 1{'0' * 400}\n"))
    assert names_key(msg, key) and "seconds" in msg, msg


def test_blockd_process_refuses_seconds_too_large_for_a_float_in_one_line(tmp_path):
    path = write(tmp_path, f"{REQUIRED}gc_interval = 1{'0' * 400}\n", "big.toml")
    p = run_blockd("--config", path)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "gc_interval" in p.stderr, p.stderr


NUL_VALUES = {
    "data_dir": '"/tmp/vbp\\u0000h1"',
    "registry": '"lmdb:///tmp/vbp\\u0000reg"',
    "listen": '"127.0.0.1\\u0000:7800"',
    "nbd": '"127.0.0.1\\u0000:10809"',
    "metrics": '"127.0.0.1\\u0000:9100"',
    "nbd_tls_cert": '"/tmp/cert\\u0000.pem"',
}


@pytest.mark.parametrize("key", sorted(NUL_VALUES))
def test_a_string_with_a_nul_is_refused(tmp_path, key):
    """TOML strings may hold \\u0000, which no path or address can: a data_dir or lmdb
    registry with one passed load, and blockd died at its first mkdir with ValueError (a
    traceback); a listen address with one was bound cut at the NUL, and published whole
    to the peers."""
    text = "\n".join(line for line in REQUIRED.splitlines() if not line.startswith(key + " "))
    extra = 'nbd_tls = "on"\nnbd_tls_key = "/tmp/k.pem"\n' if key == "nbd_tls_cert" else ""
    msg = refused(write(tmp_path, f"{text}\n{extra}{key} = {NUL_VALUES[key]}\n"))
    assert names_key(msg, key) and "NUL" in msg, msg


def test_blockd_process_refuses_a_data_dir_with_a_nul_in_one_line(tmp_path):
    path = write(tmp_path, f'host_id = "h1"\nregistry = "lmdb://{tmp_path}/reg"\n'
                           f'data_dir = "{tmp_path}/d\\u0000x"\nlisten = "127.0.0.1:0"\n'
                           f'nbd = "127.0.0.1:0"\n', "nul.toml")
    p = run_blockd("--config", path, timeout=30)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "data_dir" in p.stderr, p.stderr


def test_an_in_process_memory_registry_is_refused(tmp_path):
    """blockd on memory:// ran a pool of its own that no other host or vbp can see."""
    text = REQUIRED.replace('"lmdb:///tmp/vbp-reg"', '"memory://pool"')
    msg = refused(write(tmp_path, text))
    assert names_key(msg, "registry") and "memory://" in msg, msg


@pytest.mark.parametrize("flag, value, expect", [
    ("capacity", "0", "flag --capacity: key 'capacity': must be greater than zero"),
    ("data_dir", "{file}/data", "flag --data-dir: key 'data_dir': {file} is not a directory"),
    ("registry", "lmdb://{file}/reg", "flag --registry: key 'registry': {file} is not a directory"),
])
def test_a_bad_flag_value_checked_with_the_others_names_the_flag_not_the_file(
        tmp_path, flag, value, expect):
    """The file does not hold the key: the operator must be sent to the flag (a unit's
    ExecStart, `vbp sandbox up --capacity`), not to a file that never mentions it."""
    file = tmp_path / "file"
    file.write_text("not a directory")
    path = write(tmp_path, REQUIRED + 'zone = "z1"\n')
    with pytest.raises(InvalidArgument) as e:
        load(path, {flag: value.format(file=file)})
    assert str(e.value).startswith(expect.format(file=file)), str(e.value)
    assert path not in str(e.value)
