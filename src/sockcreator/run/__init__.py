"""``sockcreator run``: start a program with privileged sockets, then get out
of the way (:mod:`.launcher`).

This part may import: the client library (``client``), the shared public
modules ``activation`` and ``privileges``, and the broker's public client
(``broker.client``, for ``run --broker``), and ``_record``.  It must not import the broker's
internals (``broker._*``, ``broker.serve``) or ``creator.py``: the launcher
is a client of a creator or of a broker, nothing more.
"""
