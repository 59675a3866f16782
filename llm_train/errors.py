"""Errors the user can fix: one line naming the file and the fix, exit code 2, no traceback."""
import os
import sys


class UserError(Exception):
    pass


def run_main(main):
    """Call main(); turn a UserError into one clear line on stderr and exit status 2.

    A rank other than 0 of a multi-process launch ends with os._exit(0) once main() has returned: it has nothing
    left to write, and skipping the interpreter's finalization skips the teardown of gloo's C++ threads, which can
    abort the process ("terminate called without an active exception", the 2-process GRPO and SFT tests, about
    one run in twenty, also after the process group was destroyed)."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
