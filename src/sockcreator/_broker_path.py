"""The broker's socket file: created safely, a stale one replaced (see
:mod:`sockcreator.broker`, step 3)."""

from __future__ import annotations

import os
import secrets
import socket
import stat

__all__ = ["SocketPathError", "bind_unix_socket"]


class SocketPathError(Exception):
    """PATH cannot be used safely (the message says why)."""


def _check_directory(directory: str) -> None:
    """The directory and its ancestors: owned by root or us, and not
    writable by others unless sticky."""
    me = os.geteuid()
    path = os.path.realpath(directory)
    while True:
        try:
            st = os.stat(path)
        except OSError as e:
            raise SocketPathError(f"{path}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise SocketPathError(f"{path} is not a directory")
        if st.st_uid not in (0, me):
            raise SocketPathError(f"{path} is owned by uid {st.st_uid}, not root")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise SocketPathError(f"{path} is writable by others and not sticky")
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _check_stale(path: str) -> None:
    """Refuse if PATH exists and is not a socket, or a broker answers there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale: nobody listens; the rename replaces it
        except OSError as e:
            raise SocketPathError(f"{path}: cannot tell whether it is in use: {e}") from None
    raise SocketPathError(f"{path}: another process is answering there")


def bind_unix_socket(path: str, mode: int = 0o666, gid: int | None = None) -> socket.socket:
    """A listening Unix stream socket at ``path``, created safely (see step 3
    in the module doc).  SocketPathError if it cannot be."""
    if not 0 <= mode <= 0o777:
        raise SocketPathError(f"bad mode {mode:o}")
    directory, base = os.path.split(os.path.abspath(path))
    _check_directory(directory)
    _check_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = os.path.join(directory, f".{base[:40]}.{secrets.token_hex(6)}")
    try:
        old = os.umask(0o177)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        try:
            if gid is not None:
                os.chown(tmp, -1, gid)
            os.chmod(tmp, mode)
            sock.listen(socket.SOMAXCONN)
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        sock.close()
        raise SocketPathError(f"{path}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock
