"""The broker's socket file: created safely, a stale one replaced (see
:mod:`sockcreator.broker`, step 3).

Root must not follow a symlink anyone else controls, and must not let
anyone swap what a name means between a check and a use.  So the directory
is reached by walking PATH one component at a time from ``/`` with
``O_PATH|O_NOFOLLOW`` descriptors, each checked with ``fstat`` as it is
opened, and everything later happens relative to the final directory's
descriptor: nothing is looked up by the full path again.
"""

from __future__ import annotations

import os
import pwd
import secrets
import socket
import stat
from types import TracebackType

__all__ = [
    "MAX_SYMLINKS",
    "SocketFile",
    "SocketPathError",
    "bind_unix_socket",
    "create_socket_file",
    "open_directory",
]

MAX_SYMLINKS = 40  # the kernel's own limit (ELOOP)
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_SUN_PATH_MAX = 107  # sun_path is 108 bytes, with the NUL


class SocketPathError(Exception):
    """PATH cannot be used safely (the message says why)."""


def _who(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _check_directory(st: os.stat_result, shown: str, me: int) -> None:
    """Owned by root or us, and not writable by others unless sticky."""
    if not stat.S_ISDIR(st.st_mode):
        raise SocketPathError(f"{shown} is not a directory")
    if st.st_uid not in (0, me):
        raise SocketPathError(f"{shown} is owned by {_who(st.st_uid)}, not root")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise SocketPathError(f"{shown} is writable by others and not sticky")


def _join(parent: str, name: str) -> str:
    return parent + name if parent.endswith("/") else f"{parent}/{name}"


def open_directory(directory: str) -> tuple[int, str]:
    """An ``O_PATH`` descriptor of ``directory``, reached safely, and the path
    it was found at (for messages).  SocketPathError if it cannot be.

    Every directory entered on the way must pass :func:`_check_directory`.  A
    symlink is followed only if it is root's (or ours) -- it then sits in a
    directory that passed, so nobody else can replace it -- and its target
    is walked the same way; anyone else's is refused.  ``..`` goes back to
    the directory we came from (a stack of descriptors, as the kernel does).
    A relative ``directory`` starts from the current directory's path."""
    me = os.geteuid()
    if not directory.startswith("/"):
        directory = _join(os.getcwd(), directory)
    todo = directory.split("/")[::-1]  # popped from the end
    stack: list[tuple[int, str]] = []  # (descriptor, path) of each directory entered
    links = 0
    try:
        try:
            root = os.open("/", _O_PATH | os.O_DIRECTORY)
        except OSError as e:
            raise SocketPathError(f"/: {e.strerror}") from None
        stack.append((root, "/"))
        _check_directory(os.fstat(root), "/", me)
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop()[0])
                continue
            parent, parent_shown = stack[-1]
            shown = _join(parent_shown, part)
            try:
                fd = os.open(part, _O_PATH, dir_fd=parent)
            except OSError as e:
                raise SocketPathError(f"{shown}: {e.strerror}") from None
            try:
                st = os.fstat(fd)
                if stat.S_ISLNK(st.st_mode):
                    target: str | None = os.readlink("", dir_fd=fd)  # this very link
                else:
                    _check_directory(st, shown, me)
                    target = None
            except BaseException:
                os.close(fd)
                raise
            if target is None:
                stack.append((fd, shown))
                continue
            os.close(fd)
            if st.st_uid not in (0, me):
                raise SocketPathError(
                    f"{shown} -> {target} is a symbolic link owned by "
                    f"{_who(st.st_uid)}, not root: not following it"
                )
            links += 1
            if links > MAX_SYMLINKS:
                raise SocketPathError(f"{shown}: too many symbolic links")
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop()[0])
            todo.extend(target.split("/")[::-1])
        final, where = stack.pop()
    finally:
        for fd, _ in stack:
            os.close(fd)
    try:  # at the lowest free number: leave no hole where the walk's were
        return os.dup(final), where  # close-on-exec, as Python's always are
    finally:
        os.close(final)


class SocketFile:
    """The broker's listening socket, and what it takes to remove its file
    later without looking anything up by path: the directory's ``O_PATH``
    descriptor, the name in it and the inode bound there.  A context manager:
    leaving it closes the socket and the directory descriptor."""

    def __init__(
        self, sock: socket.socket, dir_fd: int, name: str, path: str, dev: int, ino: int
    ) -> None:
        self.socket = sock
        self.dir_fd = dir_fd
        self.name = name
        self.path = path  # where it was found: the resolved directory, and the name
        self.dev, self.ino = dev, ino

    def unlink_if_ours(self) -> bool:
        """Remove the socket file if it is still the one we bound (it needs
        write access to the directory, which may be gone with root): whether
        it was removed."""
        if self.dir_fd < 0:
            return False
        try:
            st = os.lstat(self.name, dir_fd=self.dir_fd)
            if (st.st_dev, st.st_ino) != (self.dev, self.ino):
                return False
            os.unlink(self.name, dir_fd=self.dir_fd)
        except OSError:
            return False
        return True

    def close_directory(self) -> None:
        if self.dir_fd >= 0:
            fd, self.dir_fd = self.dir_fd, -1
            os.close(fd)

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.close_directory()

    def __enter__(self) -> SocketFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _check_stale(dir_fd: int, name: str, shown: str) -> None:
    """Refuse if the name exists and is not a socket, or a broker answers
    there.  The probe connects through an ``O_PATH`` descriptor of the very
    inode checked (``/proc/self/fd/N``), so a swap cannot redirect it."""
    try:
        fd = os.open(name, _O_PATH, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except OSError as e:
        raise SocketPathError(f"{shown}: {e.strerror}") from None
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise SocketPathError(f"{shown} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(f"/proc/self/fd/{fd}")
            except (ConnectionRefusedError, FileNotFoundError):
                return  # stale: nobody listens; the rename replaces it
            except OSError as e:
                raise SocketPathError(f"{shown}: cannot tell whether it is in use: {e}") from None
        raise SocketPathError(f"{shown}: another process is answering there")
    finally:
        os.close(fd)


def _bind_in(dir_fd: int, where: str, name: str, mode: int, gid: int | None) -> SocketFile:
    shown = _join(where, name)
    tmp = f".{name[:40]}.{secrets.token_hex(6)}"
    here = f"/proc/self/fd/{dir_fd}"
    if len(os.fsencode(f"{here}/{name}")) > _SUN_PATH_MAX:
        raise SocketPathError(f"{shown}: the name {name!r} is too long for a Unix socket")
    if not os.path.isdir(here):
        raise SocketPathError(f"{shown}: {here} is missing (is /proc mounted?)")
    _check_stale(dir_fd, name, shown)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The kernel makes the node 0777 & ~umask (a default ACL may then
        # take bits away: checked below).
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(f"{here}/{tmp}")
        finally:
            os.umask(old)
        try:
            st = os.lstat(tmp, dir_fd=dir_fd)
            if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != mode:
                raise SocketPathError(
                    f"{shown}: the socket came out as {stat.filemode(st.st_mode)}, not "
                    f"mode {mode:o} (a default ACL on {where}?)"
                )
            if gid is not None:
                os.chown(tmp, -1, gid, dir_fd=dir_fd, follow_symlinks=False)
            sock.listen(socket.SOMAXCONN)  # only now can anyone connect
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
    except OSError as e:
        sock.close()
        raise SocketPathError(f"{shown}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return SocketFile(sock, dir_fd, name, shown, st.st_dev, st.st_ino)


def create_socket_file(path: str, mode: int = 0o666, gid: int | None = None) -> SocketFile:
    """A listening Unix stream socket at ``path`` with ``mode`` (and group
    ``gid``), created safely (see step 3 in the module doc of
    :mod:`sockcreator.broker`).  SocketPathError if it cannot be."""
    if not 0 <= mode <= 0o777:
        raise SocketPathError(f"bad mode {mode:o}")
    directory, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise SocketPathError(f"{path}: names a directory, not a socket file")
    dir_fd, where = open_directory(directory or ".")
    try:
        return _bind_in(dir_fd, where, name, mode, gid)
    except BaseException:
        os.close(dir_fd)
        raise


def bind_unix_socket(path: str, mode: int = 0o666, gid: int | None = None) -> socket.socket:
    """:func:`create_socket_file`, for callers that want only the socket."""
    f = create_socket_file(path, mode, gid)
    f.close_directory()
    return f.socket
