"""The `blockd` command."""

from __future__ import annotations

import sys

import click
import trio

from blockd import config as config_mod
from blockd import logs
from blockd.memory import tune_gc, tune_malloc
from vbp.errors import VbpError


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
def main(config_file, **flags):
    """Serve this host's disk to the vbp pool and volumes over NBD.

    \b
    Example:
      blockd --host-id h1 --data-dir /var/lib/vbp --registry lmdb:///var/lib/vbp/registry \\
             --listen 127.0.0.1:7800 --nbd 127.0.0.1:10809
    """
    try:
        cfg = config_mod.load(config_file, flags)
    except VbpError as e:
        click.echo(f"blockd: {e}", err=True)
        sys.exit(2)
    logs.setup(cfg.host_id, cfg.log_level, cfg.log_format)
    tune_malloc()
    tune_gc()
    from blockd.service import run_until_signal

    try:
        trio.run(run_until_signal, cfg)
    except VbpError as e:
        click.echo(f"blockd: {e}", err=True)
        sys.exit(1)
    except OSError as e:
        click.echo(f"blockd: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
