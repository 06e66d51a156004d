"""``sockcreator run --intercept``: every ``bind()`` of PROGRAM, of any
language and however linked, goes to a supervisor by seccomp user
notification; privileged ones the policy allows are done by the creator on
PROGRAM's own socket (the creator's ``B`` command).  See docs/intercept.md.

- :mod:`._seccomp`: the kernel interface (filter, notifications, pidfds,
  reading PROGRAM's memory), ctypes only;
- :mod:`._decide`: what to do with one bind, with no I/O;
- :mod:`.supervisor`: the loop, signals and exit status.

This part may import what ``run`` may (the client library, ``privileges``)
and its own modules.  It must not import the broker's internals or
``creator.py``; the supervisor reads untrusted memory and holds no privilege.
"""
