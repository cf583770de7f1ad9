"""Run a command as a child subreaper, to see every generation of an upgrade in place exit.

``python reaper.py COMMAND...``: the new generation that an upgrade starts is the old one's
child, and outlives it; only the process its orphans are reparented to can read its exit code
(the test runner cannot: it is not their parent). This one asks the kernel to be that process
(``PR_SET_CHILD_SUBREAPER``, Linux), starts ``COMMAND``, prints ``started PID`` and then
``exited PID CODE`` for each descendant it reaps (``CODE`` negative: killed by that signal), and
exits 0 once none is left. Signals go to the generations by pid, not through it.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl failed: errno {ctypes.get_errno()}", file=sys.stderr)
        return 2
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    say(f"started {pid}")
    while True:
        try:
            reaped, status = os.wait()
        except ChildProcessError:
            return 0
        say(f"exited {reaped} {os.waitstatus_to_exitcode(status)}")


def say(line: str) -> None:
    """One line in one write: the generations write to the same pipe."""
    os.write(1, f"{line}\n".encode())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
