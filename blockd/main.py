"""The `blockd` command.

Exit codes: 0 stopped by a signal; 2 a setting that cannot work here (a bad value, a
port another process holds or that is not this host's, a path that is not a directory or
may not be written): restarting will not fix it, and the systemd unit
(blockd/systemd/blockd@.service) does not restart on 2 (RestartPreventExitStatus);
1 any other error, such as an unreachable registry, which may well come back.
"""

from __future__ import annotations

import errno
import signal
import sys

import click
import trio

from blockd import config as config_mod
from blockd import logs
from blockd.memory import tune_gc, tune_malloc
from vbp.errors import InvalidArgument, VbpError

EXIT_ERROR, EXIT_CONFIG = 1, 2
# errors of a setting: a listen address in use, not this host's or a privileged port; a
# data directory under a file, unwritable or outside the unit's ReadWritePaths (EROFS)
CONFIG_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES, errno.EPERM,
                           errno.ENOTDIR, errno.EISDIR, errno.EROFS})


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host-id", help="This host's id in the pool (unique).")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Directory of this host's chunk store.")
@click.option("--registry", help="Registry URL: lmdb://DIR or etcd://HOST:PORT[,HOST:PORT...].")
@click.option("--listen", help="HOST:PORT of the peer protocol (port 0 picks one).")
@click.option("--nbd", help="HOST:PORT of the NBD frontend (port 0 picks one).")
@click.option("--zone", help="Failure domain: zone.")
@click.option("--pod", help="Failure domain: pod inside the zone.")
@click.option("--capacity", help="Chunk space this host offers, e.g. 100G.")
@click.option("--cluster", help="Cluster name (peers of another cluster are refused).")
@click.option("--metrics", help="HOST:PORT of the Prometheus /metrics endpoint (off by default).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-format", type=click.Choice(["kv", "json"]))
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help=f"TOML file with any of these settings (default {config_mod.DEFAULT_CONFIG} if it exists).")
@click.version_option(package_name="vbp", prog_name="blockd", message="%(prog)s %(version)s")
def main(config_file, **flags):
    """Serve this host's disk to the vbp pool and volumes over NBD.

    \b
    Example:
      blockd --host-id h1 --data-dir /var/lib/vbp --registry lmdb:///var/lib/vbp/registry \\
             --listen 127.0.0.1:7800 --nbd 127.0.0.1:10809
    """
    # A signal mask is inherited across exec: a blockd started by a process that held its
    # stop signals back meanwhile (vbp sandbox, blockd.sandbox.Sandbox._spawn) must still
    # stop on them.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    try:
        cfg = config_mod.load(config_file, flags)
    except VbpError as e:
        click.echo(f"blockd: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    logs.setup(cfg.host_id, cfg.log_level, cfg.log_format)
    tune_malloc()
    tune_gc()
    from blockd.clock import BootClock
    from blockd.service import run_until_signal

    try:
        # (on the boot clock: a suspend of the machine runs leases out here as it does in
        # the registry; blockd.clock)
        trio.run(run_until_signal, cfg, clock=BootClock())
    except BaseException as e:
        errors = _operator_errors(e)
        if errors is None:
            raise  # a bug: its traceback is what helps
        for line in dict.fromkeys(_describe(x) for x in errors):
            click.echo(f"blockd: {line}", err=True)
        sys.exit(_exit_code(errors[0]))


def _operator_errors(e: BaseException) -> list[BaseException] | None:
    """The errors inside `e` (trio's nurseries wrap them in exception groups, nested once
    per nursery) if every one is for the operator to act on (VbpError, OSError), else None."""
    if isinstance(e, BaseExceptionGroup):
        out = []
        for sub in e.exceptions:
            inner = _operator_errors(sub)
            if inner is None:
                return None
            out += inner
        return out or None
    return [e] if isinstance(e, (VbpError, OSError)) else None


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, VbpError):
        return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e.strerror or e)
    return str(e)


def _exit_code(e: BaseException) -> int:
    if isinstance(e, InvalidArgument):
        return EXIT_CONFIG
    if isinstance(e, OSError) and e.errno in CONFIG_ERRNOS:
        return EXIT_CONFIG
    return EXIT_ERROR


if __name__ == "__main__":
    main()
