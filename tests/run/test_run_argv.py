"""``run``'s plain command lines are parsed without argparse (start-up,
issue 14): whatever that parser takes, it must take exactly as
``build_parser().parse_args`` does; whatever it leaves, argparse parses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sockcreator.run.launcher import _parse_plain, build_parser

TOKENS = [
    "--user", "-u", "--group", "-g", "--listen", "-l", "--allow", "-a", "--name", "-n",
    "--backlog", "--share", "--share-name", "--linger", "--broker", "--allow-root",
    "--intercept", "--", "-h", "--help", "--list", "--user=nobody", "-unobody", "-x",
    "nobody", "tcp:127.0.0.1:80", "udp:[::1]:53", "80", "-1", "0x10", " 7 ", "1.5", "nan", "",
    "NO", "SAMEAPP", "ANY", "bogus", "/bin/true", "prog", "-v", "a b", "x=y", "--",
]  # fmt: skip


def _argparse(argv: list[str]) -> dict[str, object] | None:
    try:
        return vars(build_parser().parse_args(argv))
    except SystemExit:
        return None


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=9))
def test_whatever_the_plain_parser_takes_argparse_takes_alike(argv: list[str]) -> None:
    plain = _parse_plain(argv)
    if plain is not None:  # (repr: a --linger nan is not equal to itself)
        assert repr(vars(plain)) == repr(_argparse(argv)), argv


@pytest.mark.parametrize(
    "argv",
    [
        ["--user", "nobody", "--listen", "tcp:127.0.0.1:80", "--", "/bin/true"],
        ["-u", "nobody", "-l", "tcp:127.0.0.1:80", "-l", "udp:[::1]:53", "prog", "-v", "x"],
        ["--broker", "/run/b.sock", "--listen", "tcp:127.0.0.1:80", "--share", "SAMEAPP",
         "--share-name", "web", "--linger", "1.5", "--backlog", "16", "--", "/bin/true"],
        ["--allow-root", "--intercept", "--allow", "tcp:*:80", "--name", "web", "--", "prog"],
    ],
)  # fmt: skip
def test_the_usual_command_lines_skip_argparse(argv: list[str]) -> None:
    plain = _parse_plain(argv)
    assert plain is not None
    assert vars(plain) == _argparse(argv)


@pytest.mark.parametrize(
    "argv",
    [[], ["--help"], ["--user=nobody", "prog"], ["--list", "x", "prog"], ["--backlog", "-1", "p"],
     ["--share", "bogus", "p"], ["--user", "nobody"], ["--", "prog", "--", "x"]],
)  # fmt: skip
def test_the_rest_is_left_to_argparse(argv: list[str]) -> None:
    assert _parse_plain(argv) is None
