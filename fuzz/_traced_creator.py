"""Run creator.py under a line tracer and report its coverage on stderr at exit.

For fuzzing only: ``python -I -S -B _traced_creator.py /path/creator.py ARGS``.
The creator runs unchanged (same interpreter flags, same hardening, same
seccomp filter: the tracer makes no system calls).  Every exit of the creator
goes through ``os._exit``; just before it, one line ``\\0COV e1,e2,...`` goes
to stderr, where each e is ``from_line << 16 | to_line``: the line-to-line
transitions taken inside creator.py.  A process killed by a signal reports
nothing.  The fuzz harness turns these edges into libFuzzer features.
"""

import os
import sys

path = sys.argv[1]
sys.argv = sys.argv[1:]
edges = set()


def _global(frame, event, arg):
    if frame.f_code.co_filename != path:
        return None
    last = [0]

    def _local(frame, event, arg):
        if event == "line":
            edges.add(last[0] << 16 | frame.f_lineno)
            last[0] = frame.f_lineno
        return _local

    return _local


_real_exit = os._exit


def _exit(status):
    sys.settrace(None)
    try:
        os.write(2, b"\0COV " + ",".join(map(str, sorted(edges))).encode() + b"\n")
    except OSError:
        pass
    _real_exit(status)


os._exit = _exit
with open(path, "rb") as f:
    code = compile(f.read(), path, "exec")
sys.settrace(_global)
exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
_exit(0)  # not reached: the creator always ends in os._exit
