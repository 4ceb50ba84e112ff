"""The `vbp` command: thin click layer over control.api and blockd.sandbox.

Exit codes: 0 success, 1 error, 2 bad usage (a malformed value: a size, a name, a host id),
3 not found (a volume, snapshot or host of the pool; a local file), 4 registry unreachable,
5 `vbp pool scrub` found damage it could not repair (or a host did not finish).
6 in use (e.g. deleting a snapshot an NBD client has open; --force overrides).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import click

from vbp.errors import BadValue, InUse, NotFound, RegistryUnavailable, VbpError
from vbp.cluster import authority
from vbp.layout import SIZE_MAX, format_size

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_REGISTRY, EXIT_DAMAGE, EXIT_IN_USE = 1, 2, 3, 4, 5, 6


class State:
    def __init__(self, registry_url: str | None, as_json: bool):
        self.registry_url = registry_url
        self.json = as_json
        self._reg = None

    def registry(self):
        if self._reg is None:
            url = self.registry_url
            if not url:
                raise click.UsageError(
                    "no registry: pass --registry URL or set VBP_REGISTRY "
                    "(for the sandbox: lmdb://DIR/registry, printed by `vbp sandbox up`)"
                )
            if url.startswith("lmdb://"):
                where = Path(url[len("lmdb://"):])
                if not where.is_dir():
                    raise RegistryUnavailable(f"registry {url}: no such directory (is the pool set up?)")
                # (opened, an LMDB environment would be made there: a mistyped directory,
                # a sandbox's instead of its registry's, would become an empty pool)
                if not (where / "data.mdb").is_file():
                    raise RegistryUnavailable(
                        f"registry {url}: no registry in {where} (is the pool set up? a "
                        f"sandbox's is DIR/registry, as `vbp sandbox up` prints)")
            from vbp.registry import open_registry, refuse_in_process

            refuse_in_process(url)
            self._reg = open_registry(url)
        return self._reg


class Seconds(click.FloatRange):
    """A number of seconds in range; NaN passes FloatRange (no comparison is true of
    it) and makes a deadline that never comes."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:  # (FloatRange's own message: "'abc' is not a valid seconds")
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isnan(number):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return super().convert(number, param, ctx)


def fail(message: str, code: int = EXIT_ERROR):
    click.echo(f"vbp: error: {message}", err=True)
    sys.exit(code)


class VbpGroup(click.Group):
    """Turns every vbp error into one line and an exit code; never a traceback. click's
    own usage errors too (a bad option, a missing argument, a value out of range): one
    `vbp: error:` line and exit 2, where click printed its usage, a hint and an error on
    four lines; an interrupt (Ctrl-C, SIGTERM) is one line and exit 130, not
    "Aborted!"."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx is not None else "vbp"
            fail(f"{e.format_message().rstrip('.')} (see '{where} --help')", EXIT_USAGE)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except click.exceptions.Abort:
            fail("interrupted", 130)
        sys.exit(code if type(code) is int else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NotFound as e:
            fail(str(e), EXIT_NOT_FOUND)
        except RegistryUnavailable as e:
            fail(str(e), EXIT_REGISTRY)
        except InUse as e:
            fail(str(e), EXIT_IN_USE)
        except BadValue as e:  # (a value that can never do: bad usage, as click's own)
            fail(str(e), EXIT_USAGE)
        except VbpError as e:
            fail(str(e))
        except OSError as e:
            fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")


def json_flag(f):
    def set_json(ctx, _param, value):
        if value:
            ctx.find_object(State).json = True
        return value

    return click.option("--json", "json_", is_flag=True, expose_value=False, callback=set_json,
                        help="Print machine-readable JSON.")(f)


def out(state: State, data, human) -> None:
    if state.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human()


# Rows past which a table that does not fit the terminal is printed as it is, its lines
# left to the terminal to wrap, instead of folded into the width by rich (_rich_table):
# rich takes about 2 ms a row (`vbp volume list` of 5,000 volumes took 9 s).
FOLD_ROWS_MAX = 1000


def table(columns, rows) -> None:
    """Print `rows` under the headers `columns`: each column as wide as its widest cell,
    two spaces between columns, the header bold on a terminal. The layout is rich's
    borderless table, written out directly: rich renders each cell through its segment
    machinery, fine for a few rows and 9 s for 5,000. Rich itself is used only to fold a
    table too wide for the terminal (at most FOLD_ROWS_MAX rows), and for a cell of
    several lines. Piped output is never cut or wrapped: names must be copyable."""
    from rich.cells import cell_len  # (the width of a string on a terminal)

    header = [str(c) for c in columns]
    cells = [[str(x) for x in r] for r in rows]
    widths = [cell_len(c) for c in header]
    for r in cells:
        for i, x in enumerate(r):
            n = cell_len(x)
            if n > widths[i]:
                widths[i] = n
    tty = sys.stdout.isatty()
    if any("\n" in x for r in cells for x in r) or (
            tty and len(cells) <= FOLD_ROWS_MAX
            and sum(widths) + 2 * (len(widths) - 1) > shutil.get_terminal_size().columns):
        _rich_table(header, cells, tty)
        return

    def line(r) -> str:
        return "  ".join([x + " " * (w - cell_len(x)) for x, w in zip(r, widths)])

    head = line(header)
    click.echo("\n".join([click.style(head, bold=True) if tty else head, *map(line, cells)]))


def _rich_table(header: list[str], cells: list[list[str]], tty: bool) -> None:
    """table() through rich, which folds cells into the terminal's width. Cells are text
    as they are: rich read `[...]` as markup and `:name:` as an emoji code by default, so a
    value such as a path with brackets in it was printed changed ("[b]" vanished, making
    the rest bold) or not at all ("[/x]" raised MarkupError)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, pad_edge=False, header_style="bold")
    for c in header:
        t.add_column(c, overflow="fold")
    for r in cells:
        t.add_row(*r)
    Console(width=None if tty else 10_000, markup=False, emoji=False).print(t)


@click.group(cls=VbpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--registry", envvar="VBP_REGISTRY", metavar="URL",
              help="lmdb://DIR or etcd://HOST:PORT[,...]; default $VBP_REGISTRY.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.version_option(package_name="vbp", prog_name="vbp", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx, registry, as_json):
    """vbp: a replicated virtual block pool served over NBD.

    \b
    Examples:
      vbp sandbox up --hosts 3 --dir var/sandbox
      export VBP_REGISTRY=lmdb://$PWD/var/sandbox/registry
      vbp volume create disk1 --size 10G --replicas 3
      nbdinfo nbd://127.0.0.1:10809/disk1
    """
    ctx.obj = State(registry, as_json)


# --- shell completion of names ----------------------------------------------------------
# (`eval "$(vbp completion bash)"`: click asks these as the user presses TAB, with the
# words typed so far parsed, --registry among them; nothing may be printed, and a registry
# that is not there, or does not answer, completes nothing)


def _registry_for_completion(ctx):
    url = ctx.find_root().params.get("registry") or os.environ.get("VBP_REGISTRY")
    return State(url, False).registry()


# Seconds a TAB waits for the registry's names. An etcd member that takes connections and
# does not answer (partitioned, stopped under a proxy, a machine gone quiet) costs each
# call its request timeout, member after member: a TAB held the shell for 5 s a member.
COMPLETION_WAIT = 1.5


def _complete(ctx, names, incomplete: str) -> list[str]:
    found: list[str] = []

    def ask() -> None:
        try:
            found.extend(sorted(n for n in names(_registry_for_completion(ctx))
                                if n.startswith(incomplete)))
        except Exception:  # (completion must never fail the shell's TAB with a traceback)
            found.clear()
    # (in a thread of its own, given up on past the wait: the process then ends with it)
    asking = threading.Thread(target=ask, name="vbp-completion", daemon=True)
    asking.start()
    asking.join(COMPLETION_WAIT)
    return [] if asking.is_alive() else found


def complete_volume(ctx, param, incomplete: str) -> list[str]:
    """Volume names."""
    return _complete(ctx, lambda reg: [d["name"] for d in reg.list_volumes()], incomplete)


def complete_volume_or_snapshot(ctx, param, incomplete: str) -> list[str]:
    """Volume names, and NAME@SNAP once the name is typed with its @."""
    def names(reg):
        vols = reg.list_volumes()
        if "@" not in incomplete:
            return [d["name"] for d in vols]
        return [f"{d['name']}@{snap['name']}" for d in vols for snap in d.get("snapshots", ())]
    return _complete(ctx, names, incomplete)


def complete_host(ctx, param, incomplete: str) -> list[str]:
    """Host ids of the pool."""
    return _complete(ctx, lambda reg: reg.host_ids(), incomplete)


# --- sandbox -------------------------------------------------------------------------


@main.group()
def sandbox():
    """A local pool of N blockd processes on loopback, for demos and tests."""


def _sandbox_dict(sb, hosts):
    """The sandbox's --json: its hosts' objects, from its registry's records (read for
    --json only: the table needs none of it, and a registry that does not answer would
    hold it)."""
    from control.objects import sandbox_host_object

    cmap = _sandbox_map(sb) if hosts else None
    return {
        "dir": str(sb.dir),
        "registry": sb.registry_url,
        "hosts": [sandbox_host_object(h, cmap) for h in hosts],
    }


def _sandbox_map(sb):
    """The cluster map of the sandbox's registry, for its hosts' records; None when there
    is none to read (an embedded registry not made yet: opened, it would be) or it does
    not answer (status still tells which processes run)."""
    from vbp.registry import open_registry

    url = sb.registry_url
    if url == sb.default_registry_url and not (sb.dir / "registry" / "data.mdb").is_file():
        return None
    try:
        with open_registry(url) as reg:
            return reg.cluster_map()
    except (VbpError, OSError):
        return None


def _print_hosts(hosts):
    table(["HOST", "STATE", "PID", "NBD", "PEER PORT"],
          [(h.id, "running" if h.alive else "stopped", h.pid or "-", h.nbd_uri, h.peer_port) for h in hosts])


@sandbox.command("up")
@click.option("--hosts", "n", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@click.option("--base-port", type=click.IntRange(1, 65000), help="First port (default 10809).")
@click.option("--capacity", help="Capacity of each host started (default: the one it had, "
                                 "else 8G). A host back with another moves chunks: a change "
                                 "of data set.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="A blockd setting for every host, e.g. --set lease_ttl=4 (repeatable).")
@click.option("--registry", "sandbox_registry", metavar="URL",
              help="Registry of the hosts, e.g. etcd://127.0.0.1:2379 (default: an embedded "
                   "lmdb:// registry in DIR; remembered for later `up`s).")
@json_flag
@click.pass_obj
def sandbox_up(state, n, directory, base_port, capacity, settings, sandbox_registry):
    """Start the sandbox hosts that are not running (idempotent).

    \b
    Examples:
      vbp sandbox up --hosts 3 --dir var/sandbox
      vbp sandbox up --hosts 4 --dir var/sandbox --set lease_ttl=4   # add a host
    """
    from blockd.config import CAPACITY_MAX
    from blockd.sandbox import Sandbox
    from vbp.layout import CHUNK_SIZE_MIN, parse_size

    if capacity is not None:  # (the range blockd's settings check, as bad usage: exit 2)
        try:
            least = parse_size(capacity, CAPACITY_MAX)
        except BadValue as e:
            raise click.BadParameter(str(e), param_hint="'--capacity'") from None
        if least < CHUNK_SIZE_MIN:
            raise click.BadParameter(f"{capacity} is less than the smallest chunk, "
                                     f"{format_size(CHUNK_SIZE_MIN)}", param_hint="'--capacity'")
    sb = Sandbox(directory)
    hosts = sb.up(n, base_port, capacity, settings=_parse_settings(settings),
                  registry=sandbox_registry)
    out(state, _sandbox_dict(sb, hosts) if state.json else None, lambda: (
        _print_hosts(hosts), click.echo(f"\nexport VBP_REGISTRY={sb.registry_url}")))


def _parse_settings(items) -> dict:
    """--set KEY=VALUE items, each a blockd setting (its value is checked by Sandbox.up,
    before anything starts)."""
    from blockd.config import Config

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in Config.__dataclass_fields__:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with a blockd setting as KEY",
                                     param_hint="--set")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@sandbox.command("down")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@json_flag
@click.pass_obj
def sandbox_down(state, directory):
    """Stop every process of the sandbox.

    \b
    Example:
      vbp sandbox down --dir var/sandbox
    """
    from blockd.sandbox import Sandbox

    stopped = Sandbox(directory).down()
    out(state, {"stopped": stopped}, lambda: click.echo(
        f"stopped {', '.join(stopped)}" if stopped else "nothing was running"))


@sandbox.command("status")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@json_flag
@click.pass_obj
def sandbox_status(state, directory):
    """Show the sandbox hosts and whether they run.

    \b
    Example:
      vbp sandbox status --dir var/sandbox --json
    """
    from blockd.sandbox import Sandbox

    sb = Sandbox(directory)
    hosts = sb.hosts()
    out(state, _sandbox_dict(sb, hosts) if state.json else None,
        lambda: _print_hosts(hosts) if hosts else click.echo("no sandbox here"))


@sandbox.command("run")
@click.option("--hosts", "n", type=click.IntRange(1, 64), default=3, show_default=True)
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False))
@click.option("--base-port", type=click.IntRange(1, 65000))
@click.option("--volume", default="demo", show_default=True)
@click.option("--size", default="1G", show_default=True)
@click.option("--replicas", type=click.IntRange(1, 7), default=None, help="Default: min(3, hosts).")
@click.pass_obj
def sandbox_run(state, n, directory, base_port, volume, size, replicas):
    """Start the sandbox, create a demo volume, serve until Ctrl-C, then stop everything.

    \b
    Example:
      vbp sandbox run --hosts 3 --dir var/sandbox --volume demo --size 1G
    """
    from blockd.sandbox import Sandbox
    from control import api
    from vbp.layout import VOLUME_SIZE_MAX, parse_size
    from vbp.registry import open_registry
    from vbp.volume import new_volume

    # the volume's name, size and replicas checked before any host starts (bad usage)
    new_volume(volume, parse_size(size, VOLUME_SIZE_MAX), replicas=replicas or min(3, n))
    sb = Sandbox(directory)
    # from the start: a Ctrl-C or SIGTERM while the hosts start must stop those started
    # (they run in their own sessions: the terminal's SIGINT does not reach them)
    handlers = {signal.SIGINT: signal.getsignal(signal.SIGINT),
                signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    try:
        hosts = sb.up(n, base_port)
        reg = open_registry(sb.registry_url)
        try:
            rec = api.get_volume(reg, volume)
        except NotFound:
            rec = api.create_volume(reg, volume, size, replicas=replicas or min(3, n))
        uri = f"{hosts[0].nbd_uri}/{volume}"
        click.echo(f"vbp sandbox: {n} hosts in {sb.dir}")
        _print_hosts(hosts)
        click.echo(f"\nvolume {rec.name}: {format_size(rec.size)}, {rec.replicas} replicas")
        click.echo(f"NBD URI: {uri}\n\nTry, in another terminal:")
        click.echo(f"  nbdinfo {uri}")
        click.echo(f"  qemu-img convert -p -O raw {uri} /tmp/{volume}.raw")
        click.echo(f"  nbdcopy --progress /tmp/{volume}.raw {uri}")
        click.echo(f"  export VBP_REGISTRY={sb.registry_url}; .venv/bin/vbp volume list")
        click.echo("\nServing. Press Ctrl-C to stop.")
        while True:
            time.sleep(1)
            dead = [h.id for h in sb.hosts() if not h.alive]
            if dead:
                click.echo(f"host(s) stopped: {', '.join(dead)}; restarting", err=True)
                sb.up(n, base_port)
    except KeyboardInterrupt:
        click.echo("\nstopping")
    finally:
        # a second Ctrl-C must not cut the stop short and leave hosts running
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopped = sb.down()
        for sig, h in handlers.items():
            signal.signal(sig, h)
        click.echo(f"stopped {', '.join(stopped) or 'nothing'}")


def _interrupt(*_):
    raise KeyboardInterrupt


# --- volumes -------------------------------------------------------------------------


@main.group()
def volume():
    """Create, inspect, snapshot, clone and delete volumes."""


def _vol_dict(reg, v, losses: dict | None = None):
    """Volume `v` as every command prints it (control.objects.volume_object), with the
    accepted losses of its lineage that reach it; `losses`: Registry.list_losses, read
    once for a list."""
    from control import api
    from control.objects import volume_object

    return volume_object(v, api.accepted_losses(reg, v, losses))


def _out_volume(state, v, human) -> None:
    """Volume `v` as its object (_vol_dict) with --json, else `human()`: the losses are
    read only for the JSON."""
    out(state, _vol_dict(state.registry(), v) if state.json else None, human)


def _parent(v, volumes: dict) -> str:
    """A clone's parent as the tables show it: "(deleted)" after it when that snapshot is
    gone, and when the volume of that name now is another (deleted and made again: not
    of the clone's lineage), so the name does not point at an unrelated volume."""
    if not v.parent:
        return "-"
    name, _, snap = v.parent.partition("@")
    p = volumes.get(name)
    if p is None or p.lineage != v.lineage or snap not in {s.name for s in p.snapshots}:
        return f"{v.parent} (deleted)"
    return v.parent


def _show_volume(v, accepted=(), parent: str = "-"):
    rows = [
        ("name", v.name), ("size", f"{format_size(v.size)} ({v.size} bytes)"),
        ("replicas", v.replicas), ("min_size", v.min_size), ("chunk_size", format_size(v.chunk_size)),
        ("lineage", v.lineage), ("parent", parent),
        ("snapshots", ", ".join(s.name for s in v.snapshots) or "-"),
        ("created", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created))),
        ("qos_iops", v.qos_iops or "unlimited"),
        ("qos_bps", f"{format_size(v.qos_bps)}/s" if v.qos_bps else "unlimited"),
    ]
    table(["FIELD", "VALUE"], rows)
    for line in (_import_lines(v) + _lost_lines(v.name, v.lost)
                 + _accepted_lines(f"volume {v.name}", accepted)):
        click.echo(line)


def _import_lines(v) -> list[str]:
    """A warning for an import into `v` begun and not completed (control.api.begin_import)."""
    if not v.import_began:
        return []
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.import_began))
    return [f"warning: volume {v.name}: the import of {v.import_from} begun {when} has not "
            f"completed (failed, interrupted, or still running): the volume may hold part "
            f"of it over what it held before; import again to complete it"]


def _lost_lines(name: str, lost) -> list[str]:
    """Warnings for chunks a replicas=1 volume lost with a replaced disk."""
    return [f"warning: volume {name} lost up to {n} chunks with host {host}'s replaced disk "
            f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}; replicas=1, no other "
            f"copy): they read as zeros" for host, n, when in lost]


def _indexes(chunks, reverts: bool, more: int) -> str:
    listed = [str(i) for i, _host, r in chunks if r == reverts]
    return ", ".join(listed + (["..."] if more > len(listed) else []))


def _accepted_lines(what: str, accepted) -> list[str]:
    """Warnings for chunks whose loss an operator accepted (vbp volume accept-loss), from
    the lineage's loss record (vbp.volume.AcceptedLoss: counts, the lowest chunks listed)."""
    out = []
    for a in accepted:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.time))
        if a.since != a.time:
            when = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(a.since))} to {when}"
        parts = []
        if a.reverted:
            parts.append(f"{a.reverted} reverted to an older copy (chunks "
                         f"{_indexes(a.chunks, True, a.reverted)})")
        if a.zeroed:
            parts.append(f"{a.zeroed} lost, reading as zeros (chunks {_indexes(a.chunks, False, a.zeroed)})")
        out.append(f"warning: {what}: the loss of {a.count} chunks was accepted {when} "
                   f"(vbp volume accept-loss {a.volume}): {'; '.join(parts)}")
    return out


def _unrecoverable_lines(chunks: list[dict], most: int = 10) -> list[str]:
    """Warnings for chunks that read EIO since their last current copy was lost."""
    if not chunks:
        return []
    out = [f"warning: {len(chunks)} chunks are unrecoverable: every copy is stale and the newest "
           f"was lost with a replaced disk; they read as I/O errors until the loss is accepted "
           f"(vbp volume accept-loss NAME --chunk N --yes)"]
    for c in chunks[:most]:
        vols = ",".join(c["volumes"]) or f"lineage {c['lineage']}"
        keep = (f"would revert to {c['source']}'s older copy" if c["reverts"] else
                "no copy was ever current: would read as zeros")
        out.append(f"  {vols} chunk {c['index']}: lost with {c['last_current']}; {keep}")
    if len(chunks) > most:
        out.append(f"  ... and {len(chunks) - most} more (vbp pool status --json)")
    return out


@volume.command("accept-loss")
@click.argument("name", shell_complete=complete_volume)
@click.option("--chunk", "chunks", type=click.IntRange(0), multiple=True, metavar="N",
              help="An unrecoverable chunk of NAME to give up (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Every unrecoverable chunk of NAME.")
@click.option("--yes", is_flag=True, help="Do it: the lost bytes cannot be brought back.")
@json_flag
@click.pass_obj
def volume_accept_loss(state, name, chunks, all_, yes):
    """Give up the lost last copy of unrecoverable chunks of NAME, so they serve again.

    A chunk is unrecoverable when every copy is recorded stale and the newest was lost
    (a replaced disk held the only copy of writes the others missed): it reads and
    writes as I/O errors (`vbp pool status` lists it). This reverts it to the newest copy
    left that was current once, older than the writes acknowledged last, from which the
    other copies resync; with none (no copy was ever current) the chunk is lost and reads
    as zeros. The lineage records it (`vbp volume show` of its volumes, `vbp pool
    status`), and the hosts log it (event=loss_accepted). Refused for a chunk that is
    not unrecoverable. Without --yes nothing changes.

    \b
    Examples:
      vbp pool status                                  # lists unrecoverable chunks
      vbp volume accept-loss disk1 --chunk 7 --yes
      vbp volume accept-loss disk1 --all --yes --json
    """
    from control import api

    if bool(chunks) == all_:
        raise click.UsageError("give the chunks to accept the loss of: --chunk N (repeatable) or --all")
    reg = state.registry()
    rec, plan = api.loss_plan(reg, name, None if all_ else list(chunks))
    if not plan:
        out(state, {"volume": name, "lineage": rec.lineage, "time": None, "reverted": [],
                    "zeroed": [], "skipped": []},
            lambda: click.echo(f"volume {name} has no unrecoverable chunk: nothing to accept"))
        return
    if not yes:
        what = "; ".join(f"{c['index']}: " + (f"revert to {c['source']}'s older copy" if c["reverts"]
                                              else "lost, reads as zeros") for c in plan)
        fail(f"accepting the loss of {len(plan)} chunks of {name} ({what}) cannot be undone: "
             f"run again with --yes")
    got = api.accept_loss(reg, name, None if all_ else list(chunks))

    def human():
        for c in got["reverted"]:
            click.echo(f"chunk {c['index']}: reverted to the copy on {c['source']} (older than the "
                       f"writes acknowledged last, lost with {c['last_current']})")
        for c in got["zeroed"]:
            click.echo(f"chunk {c['index']}: lost (no copy was ever current): reads as zeros")
        for i in got["skipped"]:
            click.echo(f"chunk {i}: no longer unrecoverable (or past the end of {name}), left as it is")
        n = len(got["reverted"]) + len(got["zeroed"])
        click.echo(f"accepted the loss of {n} chunks of volume {name}; the other copies resync "
                   f"from the ones kept")

    out(state, got, human)


@volume.command("create")
@click.argument("name")
@click.option("--size", required=True, help="e.g. 10G")
@click.option("--replicas", type=click.IntRange(1, 7), default=3, show_default=True)
@click.option("--min-size", type=click.IntRange(1, 7), default=None,
              help="Replicas that must take a write (default replicas-1, at least 1).")
@click.option("--chunk-size", default="4M", show_default=True, help="1M to 64M, a power of two.")
@json_flag
@click.pass_obj
def volume_create(state, name, size, replicas, min_size, chunk_size):
    """Create a thin volume (it uses no space until written).

    \b
    Examples:
      vbp volume create disk1 --size 100G
      vbp volume create scratch --size 20G --replicas 2 --min-size 1 --chunk-size 1M
    """
    from control import api

    v = api.create_volume(state.registry(), name, size, replicas=replicas, min_size=min_size,
                          chunk_size=chunk_size)
    _warn_short_of_hosts(state, v)
    _out_volume(state, v, lambda: click.echo(
        f"created volume {v.name}: {format_size(v.size)}, {v.replicas} replicas (min {v.min_size}), "
        f"chunk {format_size(v.chunk_size)}"))


def _warn_short_of_hosts(state, v) -> None:
    """Warn when the pool places chunks on fewer hosts than volume `v` keeps copies (each
    copy on another host): below min_size every write fails. Not with no host yet (a pool
    being set up)."""
    from control import api
    from vbp.errors import VbpError

    try:
        k = api.placement_hosts(state.registry())
    except VbpError:  # (the volume is made: a warning lost is no reason to say it failed)
        return
    hosts = f"{k} host{'s' if k != 1 else ''}"
    if 0 < k < v.min_size:
        click.echo(f"vbp: warning: the pool places chunks on {hosts}; {v.name} needs "
                   f"{v.min_size} copies on distinct hosts to take a write (min size): its "
                   f"writes fail (EIO) until {v.min_size} hosts hold chunks", err=True)
    elif 0 < k < v.replicas:
        copies = f"{k} cop{'ies' if k != 1 else 'y'}"
        click.echo(f"vbp: warning: the pool places chunks on {hosts}: {v.name}'s chunks get "
                   f"{copies}, not {v.replicas}, until more hosts join (degraded)", err=True)


@volume.command("list")
@json_flag
@click.pass_obj
def volume_list(state):
    """List volumes.

    \b
    Examples:
      vbp volume list
      vbp volume list --json | jq '.[].name'
    """
    from control import api

    reg = state.registry()
    vols = api.list_volumes(reg)
    by_name = {v.name: v for v in vols}
    losses = reg.list_losses() if state.json else None
    def human():
        if not vols:
            return click.echo("no volumes")
        table(["NAME", "SIZE", "REPLICAS", "MIN", "CHUNK", "SNAPSHOTS", "PARENT"],
              [(v.name, format_size(v.size), v.replicas, v.min_size, format_size(v.chunk_size),
                len(v.snapshots), _parent(v, by_name)) for v in vols])
        for line in (line for v in vols for line in _import_lines(v)):
            click.echo(line)

    out(state, [_vol_dict(reg, v, losses) for v in vols] if state.json else None, human)


@volume.command("show")
@click.argument("name", shell_complete=complete_volume)
@json_flag
@click.pass_obj
def volume_show(state, name):
    """Show one volume.

    \b
    Examples:
      vbp volume show disk1
      vbp volume show disk1 --json | jq .snapshots
    """
    from control import api
    from control.objects import volume_object

    reg = state.registry()
    v = api.get_volume(reg, name)
    accepted = api.accepted_losses(reg, v)

    def show():
        volumes = {}
        if v.parent:
            try:
                p = api.get_volume(reg, v.parent.partition("@")[0])
                volumes[p.name] = p
            except NotFound:
                pass
        _show_volume(v, accepted, _parent(v, volumes))

    out(state, volume_object(v, accepted), show)


@volume.command("delete")
@click.argument("name", metavar="NAME|NAME@SNAP", shell_complete=complete_volume_or_snapshot)
@click.option("--force", is_flag=True,
              help="Delete even while NBD clients have it open (their requests then fail).")
@json_flag
@click.pass_obj
def volume_delete(state, name, force):
    """Delete a volume with its snapshots (the output names them), or one snapshot with
    NAME@SNAP; hosts free the chunks no volume or snapshot needs any more in the
    background. Clones of its snapshots stay, with what they read.

    A snapshot that an NBD client has open (export NAME@SNAP on any host) is not deleted
    (exit code 6) unless --force; then that client's requests fail with EIO from then on.
    The same holds for a volume a client has open (its host holds the volume's write
    lease: forced, it drops the client), or whose snapshots are open.

    \b
    Examples:
      vbp volume delete disk1
      vbp volume delete disk1@before-upgrade
    """
    from control import api

    rec = api.delete_volume(state.registry(), name, force=force)
    if rec is None:
        out(state, {"deleted": name}, lambda: click.echo(f"deleted snapshot {name}"))
        return
    snaps = [s.name for s in rec.snapshots]
    out(state, {"deleted": name, "snapshots": snaps}, lambda: click.echo(
        f"deleted volume {name}" + (f" and its snapshots {', '.join(snaps)}" if snaps else "")))


@volume.command("snapshot")
@click.argument("name", shell_complete=complete_volume)
@click.argument("snap")
@json_flag
@click.pass_obj
def volume_snapshot(state, name, snap):
    """Take a read-only snapshot NAME@SNAP (served read-only over NBD).

    \b
    Example:
      vbp volume snapshot disk1 before-upgrade      # then: nbdinfo nbd://HOST:10809/disk1@before-upgrade
    """
    from control import api

    v = api.snapshot(state.registry(), name, snap)
    _out_volume(state, v, lambda: click.echo(f"created snapshot {name}@{snap}"))


@volume.command("clone")
@click.argument("source", metavar="NAME@SNAP", shell_complete=complete_volume_or_snapshot)
@click.argument("new")
@json_flag
@click.pass_obj
def volume_clone(state, source, new):
    """Create a writable clone NEW of the snapshot NAME@SNAP.

    \b
    Example:
      vbp volume clone disk1@before-upgrade disk2
    """
    from control import api

    v = api.clone(state.registry(), source, new)
    _warn_short_of_hosts(state, v)
    _out_volume(state, v, lambda: click.echo(f"created clone {v.name} of {source}"))


@volume.command("resize")
@click.argument("name", shell_complete=complete_volume)
@click.argument("size")
@click.option("--force", is_flag=True, help="Allow shrinking (discards data past the new end).")
@json_flag
@click.pass_obj
def volume_resize(state, name, size, force):
    """Grow (or with --force shrink) a volume.

    \b
    Examples:
      vbp volume resize disk1 200G
      vbp volume resize disk1 150G --force   # data past 150G is discarded
    """
    from control import api

    v = api.resize(state.registry(), name, size, force=force)
    _out_volume(state, v, lambda: click.echo(f"volume {name} is now {format_size(v.size)}"))


@volume.command("set")
@click.argument("name", shell_complete=complete_volume)
@click.option("--iops", type=click.IntRange(0, SIZE_MAX),
              help="I/O operations per second (0: unlimited).")
@click.option("--bps", metavar="SIZE", help="Bytes per second, e.g. 50M (0: unlimited).")
@json_flag
@click.pass_obj
def volume_set(state, name, iops, bps):
    """Set a volume's QoS limits; serving hosts apply them within a second.

    Each serving host applies them to what it serves of the volume: writes go through
    the one host holding its lease, but a client reading through several hosts at once
    (or a NAME@SNAP export on another host) gets the limits on each.

    \b
    Example:
      vbp volume set noisy --iops 500 --bps 20M
    """
    from control import api

    if iops is None and bps is None:
        raise click.UsageError("nothing to set: give --iops and/or --bps")
    v = api.set_limits(state.registry(), name, iops=iops, bps=bps)
    _out_volume(state, v, lambda: click.echo(
        f"volume {name}: iops {v.qos_iops or 'unlimited'}, "
        f"bandwidth {format_size(v.qos_bps) + '/s' if v.qos_bps else 'unlimited'}"))


@contextmanager
def _progress_bar(state, description):
    """A rich progress bar on stderr when it is a terminal (never with --json); yields the
    progress callable for control.transfer, or None."""
    if state.json or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextmanager
def _count_bar(state, description):
    """A progress bar counting work items down to zero (chunks to move), or None; yields
    the `progress(left)` callable of api.wait_drained and api.wait_healthy."""
    if state.json or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=None)
        most = [0]

        def update(left: int) -> None:
            most[0] = max(most[0], left)
            bar.update(task, completed=most[0] - left, total=most[0] or None)
        yield update


@contextmanager
def _stoppable():
    """SIGTERM and SIGHUP end a transfer as Ctrl-C does (KeyboardInterrupt), so that its
    cleanup runs: an export's temporary file goes (killed by the signal's default action,
    vbp left it beside FILE: a timeout, a stopped unit, a closed session)."""
    handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _transfer_summary(verb, stats):
    """One line of what an import or export moved. An import's zeroing of the volume past
    the file's end is said apart: it is not the file's, and it may be most of the work."""
    line = (f"{verb} {format_size(stats.bytes_total)} in {stats.seconds:.1f}s: "
            f"{format_size(stats.bytes_data)} data, "
            f"{format_size(stats.bytes_zero + stats.bytes_holes)} holes or zeroes")
    if stats.bytes_tail_zeroed:
        line += f"; the volume zeroed past the file's end: {format_size(stats.bytes_tail_zeroed)}"
    return line


def _timeout_option(f):
    from control.transfer import TIMEOUT

    return click.option(
        "--timeout", type=Seconds(min=0, min_open=True), default=TIMEOUT,
        show_default=True, metavar="SECONDS",
        help="Fail when the host gives no reply for this long (hung or stopped).")(f)


def _tls_option(f):
    return click.option(
        "--tls-certificates", "tls", metavar="DIR", envvar="VBP_TLS_CERTIFICATES",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Connect with TLS (hosts with nbd_tls on or require), the client's files in "
             "DIR: ca-cert.pem, and client-cert.pem and client-key.pem if the hosts ask "
             "for a client certificate. Env: VBP_TLS_CERTIFICATES.")(f)


def _file_named(ctx, param, value: str) -> str:
    """FILE of import/export: an empty one (a variable not set in a script) read as the
    current directory, or named no file at all."""
    if value == "":
        raise click.BadParameter("empty: give a file name", ctx=ctx, param=param)
    return value


@volume.command("import")
@click.argument("file", type=click.Path(dir_okay=False), callback=_file_named)
@click.argument("name", shell_complete=complete_volume)
@click.option("--force", is_flag=True,
              help="Import even while NBD clients have NAME open (it changes under them).")
@click.option("--host", metavar="ID", help="Write through this host (default: the first one up).")
@_timeout_option
@_tls_option
@json_flag
@click.pass_obj
def volume_import(state, file, name, force, host, timeout, tls):
    """Copy the raw image FILE into volume NAME; holes stay holes.

    NAME must be at least as big as FILE; afterwards it reads as FILE followed by zeroes.
    FILE - reads the image from standard input (a pipe: its zero runs stay holes too).
    A volume that NBD clients have open (a running VM's disk) is refused (exit code 6)
    unless --force. A host that stops answering fails the import after --timeout
    seconds; import again (through another host with --host) to finish it.

    \b
    Examples:
      vbp volume create web1 --size 20G && vbp volume import debian.raw web1
      xz -dc debian.raw.xz | vbp volume import - web1
    """
    from control import api, transfer

    stdin = file == transfer.STDIN  # (a str: Path("./-") is Path("-"))
    if stdin and os.isatty(0):
        raise click.BadParameter("- reads the image from standard input, which is a terminal: "
                                 "pipe the image into it", param_hint="FILE")
    path, file = file, Path(file)
    source = transfer.STDIN_NAME if stdin else str(file.absolute())
    if stdin:
        file = Path(transfer.STDIN_NAME)  # (as messages name it)
    reg = state.registry()
    uri = transfer.volume_uri(reg, name, host=host, tls=tls is not None)
    if not force:
        api.refuse_import_in_use(reg, name)
    kind = None if stdin else transfer.image_format(file)
    if kind is not None:
        click.echo(f"vbp: warning: {file} starts with a {kind} header: import copies raw "
                   f"bytes, so the volume gets the {kind} container, not the disk in it "
                   f"(convert it first: qemu-img convert -O raw {file} {file}.raw)", err=True)
    began: list[float] = []  # (the volume's record says so from the first write on)
    try:
        with _stoppable(), _progress_bar(state, f"import {file.name}") as progress:
            stats = transfer.import_file(
                path, uri, progress=progress, timeout=timeout,
                tls_certificates=tls,
                started=lambda: began.append(api.begin_import(reg, name, source)))
    except KeyboardInterrupt:  # (click's "Aborted!" would not say what the volume holds)
        if not began:
            fail(f"interrupted: volume {name} was not changed", 130)
        fail(f"interrupted: volume {name} may hold part of {file} over what it held "
             f"before; import again to complete it", 130)
    except VbpError as e:
        if not began:
            raise
        # (a failed import said only why: the volume, neither its old disk nor the file,
        # looked like any other)
        fail(f"{e}; volume {name} may hold part of {file} over what it held before "
             f"(vbp volume show says so until an import completes): import again to "
             f"complete it")
    api.end_import(reg, name, began[0])
    out(state, {"volume": name, "file": str(file), "uri": uri, **stats.to_dict()},
        lambda: click.echo(_transfer_summary(f"imported {file} into {name}:", stats)))


@volume.command("export")
@click.argument("name", metavar="NAME[@SNAP]", shell_complete=complete_volume_or_snapshot)
@click.argument("file", type=click.Path(dir_okay=False), callback=_file_named)  # (a str:
# a Path makes ./- of -)
@click.option("--force", is_flag=True,
              help="Replace FILE if it exists (once the copy is complete).")
@click.option("--host", metavar="ID", help="Read through this host (default: the first one up).")
@_timeout_option
@_tls_option
@json_flag
@click.pass_obj
def volume_export(state, name, file, force, host, timeout, tls):
    """Copy volume or snapshot NAME[@SNAP] into the raw image FILE, a sparse file.

    The copy is written beside FILE and takes its name once complete and synced: a failed
    or interrupted export leaves no partial FILE, and an existing one (--force) whole. A
    host that stops answering fails the export after --timeout seconds.

    FILE - writes the image to standard output (a pipe: holes as zeroes; ./- names a
    file), the summary going to standard error; a failure leaves it incomplete, as the
    exit code says.

    \b
    Examples:
      vbp volume export web1@nightly /backup/web1.raw
      vbp volume export web1@nightly - | zstd > /backup/web1.raw.zst
    """
    from control import transfer

    if file == transfer.STDOUT:  # (rbd export's standard output: never a file named "-")
        if os.isatty(1):
            raise click.BadParameter("- writes the image to standard output, which is a "
                                     "terminal: pipe it into a command or a file",
                                     param_hint="FILE")
        return _export_to_stdout(state, name, host, timeout, tls)
    uri = transfer.volume_uri(state.registry(), name, host=host, tls=tls is not None)
    try:
        with _stoppable(), _progress_bar(state, f"export {name}") as progress:
            stats = transfer.export_volume(uri, file, progress=progress, overwrite=force,
                                           timeout=timeout, tls_certificates=tls)
    except KeyboardInterrupt:  # (its temporary file is gone: export_volume's cleanup)
        fail(f"interrupted: {file} was not written"
             + (" (the file there is as it was)" if force and os.path.exists(file) else ""),
             130)
    out(state, {"volume": name, "file": str(file), "uri": uri, **stats.to_dict()},
        lambda: click.echo(_transfer_summary(f"exported {name} to {file}:", stats)))


def _export_to_stdout(state, name, host, timeout, tls):
    """`vbp volume export NAME -`: the image on standard output, so everything said goes to
    standard error (the summary, --json's object too)."""
    from control import transfer

    uri = transfer.volume_uri(state.registry(), name, host=host, tls=tls is not None)
    try:
        with _stoppable(), _progress_bar(state, f"export {name}") as progress:
            stats = transfer.export_stream(uri, 1, progress=progress, timeout=timeout,
                                           tls_certificates=tls)
    except KeyboardInterrupt:
        fail(f"interrupted: the image of {name} on standard output is incomplete", 130)
    except transfer.TransferError as e:
        fail(f"{e}; the image of {name} on standard output is incomplete")
    data = {"volume": name, "file": transfer.STDOUT_NAME, "uri": uri, **stats.to_dict()}
    click.echo(json.dumps(data, indent=2, sort_keys=True) if state.json else
               _transfer_summary(f"exported {name} to {transfer.STDOUT_NAME}:", stats), err=True)


# --- hosts ---------------------------------------------------------------------------


@main.group()
def host():
    """Hosts of the pool."""


@host.command("list")
@json_flag
@click.pass_obj
def host_list(state):
    """List hosts with their failure domain and state.

    \b
    Examples:
      vbp host list
      vbp host list --json | jq '.hosts[] | select(.state == "down") | .id'
    """
    from control.objects import data_role, host_object

    cmap = state.registry().cluster_map()
    out(state, {"epoch": cmap.epoch, "hosts": [host_object(cmap, h) for h in cmap.hosts]}, lambda: table(
        ["HOST", "STATE", "DATA", "REWEIGHT", "ZONE", "POD", "CAPACITY", "NBD", "PEER"],
        [(h.id, h.state + (" (maintenance)" if h.maintenance else ""), data_role(cmap, h.id),
          _reweight(cmap, h.id), h.zone, h.pod, format_size(h.capacity), authority(h.nbd),
          authority(h.peer))  # (an IPv6 address in brackets: ::1:10809 reads as an address)
         for h in cmap.hosts]))


def _reweight(cmap, host_id: str) -> str:
    """The host's placement weight factor (1.00 unless lowered because it is nearly full);
    old->new while a change of data set applies a new one."""
    now = f"{cmap.factors.get(host_id, 1.0):.2f}"
    if cmap.prev is not None and cmap.prev_factors.get(host_id, 1.0) != cmap.factors.get(host_id, 1.0):
        return f"{cmap.prev_factors.get(host_id, 1.0):.2f}->{now}"
    return now


def _host_command(state, host_id, fn, done):
    """`fn(registry)` on host `host_id`, and what it did: `done`, a line, or a function of
    the host record after it (its state may not be the one asked for: a host down). The
    JSON has the host's object after it, or, removed, as it was just before."""
    from control import api
    from control.objects import host_object

    reg = state.registry()
    before = reg.cluster_map()
    if before.host(host_id) is None:
        raise api.no_such_host(host_id)
    cmap = fn(reg)
    h = cmap.host(host_id)
    line = done(h) if callable(done) else done
    obj = host_object(cmap, h) if h is not None else host_object(before, before.host(host_id))
    out(state, {"epoch": cmap.epoch, "host": obj},
        lambda: click.echo(f"{line} (epoch {cmap.epoch})"))
    return cmap


@host.command("drain")
@click.argument("host_id", shell_complete=complete_host)
@click.option("--wait", "wait", is_flag=True, help="Wait until no chunk is placed on the host.")
@click.option("--timeout", type=Seconds(0), default=3600.0, show_default=True, help="Seconds --wait waits.")
@json_flag
@click.pass_obj
def host_drain(state, host_id, wait, timeout):
    """Move every chunk off a host, then keep it empty (state draining).

    Each chunk is copied to the host that placement picks without this one, and stays
    readable and fully replicated throughout. When the host shows DATA "out" in
    `vbp host list`, stop its blockd, then `vbp host remove ID` forgets it. A host that is
    down leaves the data set at once too, without waiting out its down_out_interval: its
    chunks are copied from the other replicas.

    \b
    Example:
      vbp host drain host3 --wait     # then stop blockd on host3, and:
      vbp host remove host3
    """
    _timeout_needs_wait(wait)
    if not wait:
        _nowhere_to_drain(state, _host_command(state, host_id,
                                               lambda r: r.set_host_state(host_id, "draining"),
                                               f"host {host_id} is draining"), host_id)
        return
    from control import api

    reg = state.registry()
    if reg.cluster_map().host(host_id) is None:
        raise api.no_such_host(host_id)
    _nowhere_to_drain(state, reg.set_host_state(host_id, "draining"), host_id)
    try:
        with _count_bar(state, f"drain {host_id}") as progress:
            st = api.wait_drained(reg, host_id, timeout=timeout, progress=progress)
    except KeyboardInterrupt:  # (click's "Aborted!" would not say the drain goes on)
        fail(f"interrupted: host {host_id} stays draining, its chunks moving off as before "
             f"(`vbp host undrain {host_id}` stops that)", 130)
    from control.objects import host_object

    cmap = reg.cluster_map()
    out(state, {"epoch": cmap.epoch, "host": host_object(cmap, cmap.host(host_id)), "data_set": st},
        lambda: click.echo(f"host {host_id} is drained: no chunk is placed on it (epoch {cmap.epoch})"))


def _timeout_needs_wait(wait: bool) -> None:
    """A --timeout given without --wait would be ignored: bad usage."""
    ctx = click.get_current_context()
    if not wait and ctx.get_parameter_source("timeout") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--timeout is how long --wait waits: give --wait too")


def _nowhere_to_drain(state, cmap, host_id: str) -> None:
    """A note (stderr) when the chunks of a host just drained cannot move yet: no other
    host of `cmap` is up, or too few for a volume's replicas (api.drains_held)."""
    from control import api

    others = [h for h in cmap.hosts if h.id != host_id and h.state == "up"]
    if not others:
        click.echo(f"note: no other host is up: host {host_id}'s chunks stay on it until "
                   "one is", err=True)
        return
    held = [x for x in api.drains_held(cmap, state.registry().list_volumes()) if x["host"] == host_id]
    if held:
        click.echo(f"note: host {host_id}'s chunks stay on it: {api.drain_held_reason(held[0])}",
                   err=True)


@host.command("undrain")
@click.argument("host_id", shell_complete=complete_host)
@json_flag
@click.pass_obj
def host_undrain(state, host_id):
    """Return a draining host to service (state up).

    \b
    Example:
      vbp host undrain host3
    """
    _host_command(state, host_id, lambda r: r.set_host_state(host_id, "up"),
                  lambda h: f"host {host_id} is up" if h is None or h.state == "up"
                  else f"host {host_id} is no longer draining (it is {h.state})")


@host.command("remove")
@click.argument("host_id", shell_complete=complete_host)
@json_flag
@click.pass_obj
def host_remove(state, host_id):
    """Forget a host. Refused while chunks are placed on it: drain it first (a host that
    stays down past the down_out_interval is drained by recovery once enough other hosts
    are up). Refused too while its blockd runs (exit code 6): one still running would
    register again at its next heartbeat, as a new host that is up and not draining, and
    take chunks again. Stop it first; it counts as stopped once its heartbeat_ttl passed.

    \b
    Example:
      vbp host drain host3 --wait     # then stop blockd on host3, and:
      vbp host remove host3
    """
    _host_command(state, host_id, lambda r: r.remove_host(host_id, unless_alive=True),
                  f"host {host_id} removed")


@host.command("maintenance")
@click.argument("host_id", shell_complete=complete_host)
@click.argument("mode", type=click.Choice(["on", "off"]))
@json_flag
@click.pass_obj
def host_maintenance(state, host_id, mode):
    """Keep a host from being declared down while it restarts on purpose.

    \b
    Examples:
      vbp host maintenance host1 on && systemctl restart blockd@host1
      vbp host maintenance host1 off && vbp pool status --wait
    """
    _host_command(state, host_id, lambda r: r.set_maintenance(host_id, mode == "on"),
                  f"host {host_id} maintenance {mode}")


@main.group()
def pool():
    """The pool as a whole."""


@pool.command("status")
@click.option("--wait", "wait", is_flag=True,
              help="First wait (with a progress bar) until no chunk is degraded or moving.")
@click.option("--timeout", type=Seconds(0), default=3600.0, show_default=True, help="Seconds --wait waits.")
@json_flag
@click.pass_obj
def pool_status(state, wait, timeout):
    """Capacity per host, degraded chunks (a replica missed writes), resync progress and
    a change of data set under way (recovery, drain, rebalance) with the chunks it still
    has to move.

    \b
    Examples:
      vbp pool status
      vbp pool status --wait      # after a host came back or was drained
    """
    _timeout_needs_wait(wait)
    reg = state.registry()
    if wait:
        from control import api

        with _count_bar(state, "healing") as progress:
            api.wait_healthy(reg, timeout=timeout, progress=progress)
    cmap = reg.cluster_map()
    stats = reg.host_stats()
    stale = reg.list_stale()
    degraded = {(r.lineage, r.index) for r in stale}
    hosts = []
    for h in cmap.hosts:
        st = stats.get(h.id, {})
        hosts.append({"id": h.id, "state": h.state, "maintenance": h.maintenance,
                      "capacity": st.get("capacity", h.capacity), "used": st.get("used"),
                      "free": st.get("free"), "disk_free": st.get("disk_free"),
                      "chunks": st.get("chunks"),
                      "checksum_errors": st.get("checksum_errors"),
                      "resync_bytes": st.get("resync_bytes"),
                      "recovery_held_full": st.get("recovery_held_full") or 0,
                      "nearfull_ratio": st.get("nearfull_ratio"),
                      "reweight": cmap.factors.get(h.id, 1.0),
                      "scrub": st.get("scrub")})  # the host's last scrub pass, if any
    total = sum(x["capacity"] or 0 for x in hosts)
    used = sum(x["used"] or 0 for x in hosts)
    from control import api

    ds = api.data_set_status(reg)
    vols = reg.list_volumes()
    data = {"epoch": cmap.epoch, "hosts": hosts, "capacity": total, "used": used,
            "degraded_chunks": len(degraded), "stale_replicas": len(stale),
            "volumes": len(vols), "data_set": ds,
            "lost": [{"volume": v["name"], "host": h, "chunks": n, "time": t}
                     for v in vols for h, n, t in v.get("lost", ())],
            # chunks that read EIO: their last current copy was lost (vbp volume accept-loss)
            "unrecoverable": api.unrecoverable_chunks(reg),
            # chunks given up by vbp volume accept-loss, per lineage (its loss record)
            "accepted_losses": api.accepted_losses_by_lineage(reg, vols)}

    def human():
        table(["HOST", "STATE", "CAPACITY", "USED", "FREE", "CHUNKS", "RESYNCED"],
              [(x["id"], x["state"] + (" (maintenance)" if x["maintenance"] else ""),
                format_size(x["capacity"] or 0),
                "-" if x["used"] is None else format_size(x["used"]),
                "-" if x["free"] is None else format_size(x["free"]),
                "-" if x["chunks"] is None else x["chunks"],
                "-" if x["resync_bytes"] is None else format_size(x["resync_bytes"])) for x in hosts])
        click.echo(f"\n{data['volumes']} volumes; {format_size(used)} used of {format_size(total)}; "
                   f"{len(degraded)} degraded chunks ({len(stale)} stale replicas); epoch {cmap.epoch}")
        if ds["leaving"] is not None:
            scanning = [h for h in ds["unscanned"] if h not in ds.get("down", ())]
            click.echo(f"data set changing (generation {ds['generation']}): "
                       f"{','.join(ds['leaving'])} -> {','.join(ds['hosts'])}; "
                       f"{ds['moving_chunks']} chunks to move (at most {format_size(ds['moving_bytes'])})"
                       + (f"; waiting for {','.join(scanning)} to scan" if scanning else ""))
            for h in ds.get("down", ()):
                click.echo(f"warning: {h} is down and alone holds chunks that move: they are "
                           f"unreadable, and the change waits, until it is back (or back on a new "
                           f"disk: its copies are then given up as lost)")
            for x in ds["short_of_space"]:
                click.echo(f"warning: {x['host']} must receive up to {format_size(x['needs'])} but has "
                           f"{format_size(x['free'])} free: the change cannot complete until space is "
                           f"freed or a host is added")
        _down_notes(ds)
        _space_notes(hosts, ds)
        for v in vols:
            for line in _lost_lines(v["name"], v.get("lost", ())):
                click.echo(line)
        from vbp.volume import AcceptedLoss

        for a in data["accepted_losses"]:
            vs = ",".join(a["volumes"]) or f"lineage {a['lineage']}"
            for line in _accepted_lines(f"volumes {vs}", [AcceptedLoss.from_dict(a)]):
                click.echo(line)
        for line in _unrecoverable_lines(data["unrecoverable"]):
            click.echo(line)
        for x in hosts:
            if x["recovery_held_full"]:
                click.echo(f"warning: {x['id']} is above its full threshold "
                           f"({(x['used'] or 0) * 100 // max(1, x['capacity'] or 1)}% used): "
                           f"{x['recovery_held_full']} chunk copies wait for space")

    out(state, data, human)


def _down_notes(ds: dict) -> None:
    """Down hosts still in the data set: their chunks run degraded until they return or
    the controller takes them out (after its down_out_interval, or at once if drained).
    Draining hosts whose chunks cannot move (api.drains_held)."""
    from control import api

    for x in ds.get("drains_held", ()):
        click.echo(f"warning: {x['host']} is draining but its chunks stay on it: "
                   f"{api.drain_held_reason(x)}")
    for x in ds.get("down_in", ()):
        h = x["host"]
        if x["kept"]:
            click.echo(f"warning: {h} is down and stays in the data set: too few other hosts for "
                       f"the replica count, or a volume with one replica may have its only copy "
                       f"there; its chunks run degraded until it returns")
        elif x["drained"]:
            click.echo(f"warning: {h} is down and drained: it leaves the data set at the "
                       f"controller's next step")
        elif x["out_in"] is not None:
            left = round(x["out_in"])
            click.echo(f"warning: {h} is down, still in the data set: its chunks run degraded; "
                       f"they move elsewhere in {left // 60}m{left % 60:02d}s unless it returns "
                       f"(down_out_interval {x['interval']:g} s; `vbp host drain {h}`: now)")
        else:
            click.echo(f"warning: {h} is down, still in the data set: its chunks run degraded; "
                       f"they move elsewhere once it has been down for the controller's "
                       f"down_out_interval unless it returns (`vbp host drain {h}`: now)")


def _space_notes(hosts: list[dict], ds: dict) -> None:
    """Hosts whose placement inputs change, lowered placement weights, and hosts above
    their nearfull threshold."""
    def pct(x) -> str:
        return f"{(x['used'] or 0) * 100 // max(1, x['capacity'] or 1)}% used"

    inset = [x for x in hosts if x["id"] in ds["hosts"]]
    for c in ds.get("placement", ()):
        was, now = c["from"], c["to"]
        what = ", ".join(f"{k} {format_size(was[k]) if k == 'capacity' else was[k]} -> "
                         f"{format_size(now[k]) if k == 'capacity' else now[k]}"
                         for k in ("capacity", "zone", "pod") if was[k] != now[k])
        click.echo(f"{c['host']} placed by {what}: "
                   + ("a change of data set starts to move its chunks" if c["pending"] else
                      "chunks move as the data set changes"))
    for x in hosts:
        if x["reweight"] < 1:
            click.echo(f"{x['id']} placement weight {x['reweight']:.2f} (lowered: above its nearfull "
                       f"threshold; {pct(x)} now): new chunks go to hosts with room")
    nearfull = [x for x in inset if x["used"] is not None and x["nearfull_ratio"]
                and x["used"] > x["nearfull_ratio"] * (x["capacity"] or 0)]
    for x in nearfull:
        click.echo(f"warning: {x['id']} is above its nearfull threshold ({pct(x)}, "
                   f"threshold {round(x['nearfull_ratio'] * 100)}%)")
    for x in hosts:
        if x.get("disk_free") is not None and x["free"] is not None and x["disk_free"] < x["free"]:
            click.echo(f"warning: {x['id']}'s disk has {format_size(x['disk_free'])} free, less "
                       f"than the {format_size(x['free'])} its capacity leaves: writes there may "
                       f"fail with ENOSPC before the pool counts it full (lower its capacity, or "
                       f"free the disk)")
    if nearfull and len(nearfull) == len(inset):
        click.echo("warning: every host is nearly full: no host has room to take chunks off the "
                   "others; add hosts or capacity")


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell):
    """Print the shell completion script for SHELL.

    \b
    Examples:
      eval "$(vbp completion bash)"                              # in ~/.bashrc
      vbp completion fish > ~/.config/fish/completions/vbp.fish
    """
    from click.shell_completion import get_completion_class

    comp = get_completion_class(shell)(main, {}, "vbp", "_VBP_COMPLETE")
    source = comp.source()
    if shell == "bash":
        source = _bash_words(source)
    click.echo(source)


# bash splits COMP_WORDS at COMP_WORDBREAKS too, '@' among them: NAME@SNAP came to vbp as
# three words and completed nothing. The words are taken from the line up to the cursor,
# split at blanks only, and what bash replaces (the word's end after its last break
# character) is what each completion leaves once that part of the word is taken off.
_BASH_CLICK_CALL = ('    response=$(env COMP_WORDS="${COMP_WORDS[*]}" COMP_CWORD=$COMP_CWORD '
                    '_VBP_COMPLETE=bash_complete $1)\n')
_BASH_VBP_CALL = """    local line="${COMP_LINE:0:COMP_POINT}" keep="" i
    local -a words
    IFS=$' \\t' read -r -a words <<< "$line"
    [[ ${#words[@]} -eq 0 || $line == *[[:space:]] ]] && words+=("")
    local cur="${words[${#words[@]}-1]}"
    for ((i = ${#cur} - 1; i >= 0; i--)); do
        if [[ $COMP_WORDBREAKS == *"${cur:i:1}"* ]]; then keep="${cur:0:i}"; break; fi
    done
    response=$(env COMP_WORDS="${words[*]}" COMP_CWORD=$((${#words[@]} - 1)) _VBP_COMPLETE=bash_complete $1)
"""


def _bash_words(source: str) -> str:
    if _BASH_CLICK_CALL not in source or "COMPREPLY+=($value)" not in source:
        return source  # (another click: its own script, as it is)
    return (source.replace(_BASH_CLICK_CALL, _BASH_VBP_CALL)
            .replace("COMPREPLY+=($value)", 'COMPREPLY+=("${value#"$keep"}")'))


@pool.command("scrub")
@click.option("--volume", metavar="NAME", help="Scrub only this volume (and its snapshots).")
@click.option("--timeout", type=Seconds(0), default=0, show_default=True,
              help="Seconds to wait for the hosts; 0: until they finish.")
@json_flag
@click.pass_obj
def pool_scrub(state, volume, timeout):
    """Verify every chunk on all its replicas now and repair bad copies.

    Every host that is up rereads the chunks it is the first replica of, checks each 4 KiB
    page against its checksum, compares versions and checksums with the other replicas,
    and rewrites a rotten or divergent copy from the agreeing good ones; a copy missing on
    a current replica is recorded stale, for resync to copy back. Blockd does the
    same in the background every `scrub_interval` seconds. Counts are in pages. Exits with
    status 5 if a damaged page could not be repaired or a host did not finish.

    \b
    Examples:
      vbp pool scrub
      vbp pool scrub --volume web1 --json
    """
    from control import api

    reg = state.registry()
    rid, hosts = api.request_scrub(reg, volume or "")
    with _scrub_bar(state, f"scrub {volume or 'pool'}") as progress:
        results = api.wait_scrub(reg, rid, hosts, timeout=timeout, progress=progress)
    cmap = reg.cluster_map()
    for h in cmap.hosts:  # (down when asked: its copies went unchecked, not clean)
        if h.state == "down" and h.id in cmap.data_set and h.id not in results:
            results[h.id] = {"state": "down"}
    total = api.scrub_summary(results)
    data = {"id": rid, "volume": volume or "", "hosts": results, "total": total}

    def human():
        table(["HOST", "STATE", "CHUNKS", "VERIFIED", "ERRORS", "REPAIRED", "UNREPAIRABLE", "BUSY"],
              [(h, r.get("state", "-"), r.get("chunks", 0), format_size(r.get("bytes", 0)),
                _kinds(r.get("errors", {})), r.get("repaired", 0), r.get("unrepairable", 0),
                r.get("busy", 0)) for h, r in sorted(results.items())])
        failed = [f"{h}: {r['error']}" for h, r in sorted(results.items()) if r.get("error")]
        for line in failed:
            click.echo(f"failed on {line}", err=True)
        click.echo(f"\n{total['chunks']} chunks checked, {total['error_pages']} damaged pages found, "
                   f"{total['repaired']} repaired, {total['unrepaired']} not repaired"
                   + (f", {total['missing']} missing copies recorded stale for resync"
                      if total["missing"] else "")
                   + ("" if total["ok"] else " -- NOT CLEAN")
                   + "".join(f"\n{h} {r['state']}: its copies were not checked"
                             for h, r in sorted(results.items())
                             if r.get("state") in ("down", "unfinished")))

    out(state, data, human)
    if not total["ok"]:
        sys.exit(EXIT_DAMAGE)


def _kinds(errors: dict) -> str:
    if not errors:
        return "0"
    return ", ".join(f"{n} {kind}" for kind, n in sorted(errors.items()))


@contextmanager
def _scrub_bar(state, description):
    """A rich progress bar of chunks done out of a total on stderr when it is a terminal
    (never with --json); yields the `progress(done, total)` callable of api.wait_scrub, or
    None. (Not _count_bar, whose callable counts work left down to zero.)"""
    if state.json or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


if __name__ == "__main__":
    main(prog_name="vbp")
