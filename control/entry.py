"""The `vbp` command's entry point (pyproject.toml [project.scripts]).

It imports the command line (control.cli: click and the registry clients, about 0.1 s)
inside a handler for Ctrl-C. A Ctrl-C in that time, before the command line's own handler
(VbpGroup.main) is there, printed a KeyboardInterrupt traceback; it ends the command as
that handler does: one line, exit 130.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from control.cli import main as cli
    except KeyboardInterrupt:
        print("vbp: error: interrupted", file=sys.stderr)
        sys.exit(130)
    cli()
