"""``sockcreator serve``: one broker shares privileged sockets among many
unprivileged programs (see docs/broker.md).

- :mod:`.serve`: the command line (``serve`` and ``status``);
- :mod:`._server`: connections, requests and answers on one event loop;
- :mod:`._table`: the sharing rules and the bookkeeping (pure state);
- :mod:`._protocol`: the wire protocol, with no I/O;
- :mod:`._creator`: the link to the broker's creator; :mod:`._factory`: the
  root process that starts a new one for a widening reload;
- :mod:`._audit`: the audit log; :mod:`._path`: the socket file;
- :mod:`.policy`: the policy file;
- :mod:`._notify`: the service manager's notifications (``sd_notify``);
- :mod:`.client` (``Broker``) and :mod:`.aio` (``AsyncBroker``), for
  programs, over :mod:`._clientlib`, which holds everything the two share
  that is not I/O (errors, request templates, turning answers into sockets);
  the twins differ only in how they wait, and what ``duplicates`` pairs
  between them is their public signatures and the context-manager protocol.

This part may import: the client library (``client``: the creator protocol,
errors, descriptor handling), the shared ``privileges`` and ``_terminal``,
and ``activation`` (the broker's own socket may be passed by its starter:
LISTEN_FDS).  It must not
import ``run`` or ``creator.py``.  Only :mod:`.client` (and what it needs:
:mod:`._protocol`) is for other parts; the rest is the daemon's own.
"""
