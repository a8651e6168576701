"""The ``prism`` executable (``python -m prism_cli`` too): the app, with the edges of a process around it.

Importing the app takes about a second (torch, transformers, every command), and Ctrl-C there raised a
traceback; and once a command has succeeded, its outputs are in place: a signal during the interpreter's
shutdown made a finished run exit as if killed. Tests call ``prism_cli.app.main`` in their own process,
whose signal handling this module leaves alone.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    try:
        from prism_cli.app import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: stopped by the user before the command started; nothing was written\n")
        sys.exit(130)  # 128 + SIGINT, as the app exits after Ctrl-C
    try:
        run()
    except SystemExit as exc:
        if exc.code in (0, None):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
