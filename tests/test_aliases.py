"""Alias table, :include: and .forward parsing (aliases(5), Postfix local(8))."""

from __future__ import annotations

import pytest

from mailserver.aliases import (
    AliasSyntaxError,
    AliasTarget,
    load_aliases,
    parse_aliases,
    parse_forward,
    parse_targets,
)


def addr(v: str) -> AliasTarget:
    return AliasTarget("address", v)


def test_simple_entries_and_case_insensitive_names() -> None:
    table = parse_aliases("Postmaster: root\nroot: alice@example.com\n")
    assert table == {
        "postmaster": [addr("root")],
        "root": [addr("alice@example.com")],
    }
    assert table.warnings == []


def test_continuation_lines_comments_and_blank_lines() -> None:
    text = (
        "# the staff list\n"
        "\n"
        "staff: alice,\n"
        "   bob,\n"
        "# a comment between continuation lines does not end the entry\n"
        "\tcarol\n"
        "   \n"
        "   , dave\n"
        "other: eve\n"
    )
    table = parse_aliases(text)
    assert table["staff"] == [addr("alice"), addr("bob"), addr("carol"), addr("dave")]
    assert table["other"] == [addr("eve")]


def test_quoted_command_with_commas_file_include_and_backslash_user() -> None:
    table = parse_aliases(
        'list: "|/usr/bin/foo -x, y", /var/spool/archive, :include:/etc/mail/list,'
        " \\alice, |/usr/bin/plain arg\n"
    )
    assert table["list"] == [
        AliasTarget("command", "/usr/bin/foo -x, y"),
        AliasTarget("file", "/var/spool/archive"),
        AliasTarget("include", "/etc/mail/list"),
        AliasTarget("address", "\\alice"),
        AliasTarget("command", "/usr/bin/plain arg"),
    ]


def test_quoted_name_and_route_address() -> None:
    table = parse_aliases('"John Doe": John Doe <john@example.com>, "jd x"@example.org\n')
    assert table["john doe"] == [addr("john@example.com"), addr('"jd x"@example.org')]


def test_include_prefix_is_case_insensitive_and_home_file() -> None:
    assert parse_targets(":INCLUDE: /etc/x, ~/mbox") == [
        AliasTarget("include", "/etc/x"),
        AliasTarget("file", "~/mbox"),
    ]


def test_empty_values_are_skipped() -> None:
    assert parse_targets("a,, b ,") == [addr("a"), addr("b")]


def test_duplicate_name_last_wins_with_warning() -> None:
    table = parse_aliases("root: alice\nROOT: bob\n", filename="/etc/aliases")
    assert table["root"] == [addr("bob")]
    assert len(table.warnings) == 1
    assert table.warnings[0].startswith("/etc/aliases:2: duplicate entry for 'root'")


def test_leading_continuation_without_entry_is_warned_and_ignored() -> None:
    table = parse_aliases("  stray\nroot: alice\n", filename="a")
    assert table == {"root": [addr("alice")]}
    assert table.warnings and table.warnings[0].startswith("a:1:")


@pytest.mark.parametrize(
    ("text", "lineno"),
    [
        ("root: alice\nno colon here\n", 2),
        ("root: alice\n: bob\n", 2),
        ('root: alice\n"": bob\n', 2),
        ("root: alice\n\nuser@example.com: bob\n", 3),
        ("root:\n", 1),
        ('root: "|unterminated\n', 1),
        ("# c\nroot: |\n", 2),
        ("a, b: c\n", 1),
    ],
)
def test_syntax_errors_carry_file_and_line(text: str, lineno: int) -> None:
    with pytest.raises(AliasSyntaxError) as info:
        parse_aliases(text, filename="/etc/aliases")
    assert info.value.filename == "/etc/aliases"
    assert info.value.lineno == lineno
    assert str(info.value).startswith(f"/etc/aliases:{lineno}: ")
    assert isinstance(info.value, ValueError)


def test_error_in_continued_entry_reports_its_first_line() -> None:
    with pytest.raises(AliasSyntaxError) as info:
        parse_aliases("root: alice\nbad: x,\n  \"|oops\n")
    assert info.value.lineno == 2


def test_parse_forward_lines_and_comments() -> None:
    text = (
        "# forward everything\n"
        "alice@example.org, \\alice\n"
        "\n"
        '"|/usr/bin/procmail -f-"\n'
        "   # indented comment\n"
        "/home/alice/backup.mbox\n"
    )
    assert parse_forward(text) == [
        addr("alice@example.org"),
        addr("\\alice"),
        AliasTarget("command", "/usr/bin/procmail -f-"),
        AliasTarget("file", "/home/alice/backup.mbox"),
    ]


def test_parse_forward_error_has_line_number() -> None:
    with pytest.raises(AliasSyntaxError) as info:
        parse_forward('ok\n"|broken\n', filename="/home/a/.forward")
    assert str(info.value).startswith("/home/a/.forward:2: ")


def test_parse_forward_crlf() -> None:
    assert parse_forward("a\r\nb\r\n") == [addr("a"), addr("b")]


def test_load_aliases_reads_file(tmp_path) -> None:
    path = tmp_path / "aliases"
    path.write_text("root: alice\nbad line\n")
    with pytest.raises(AliasSyntaxError) as info:
        load_aliases(str(path))
    assert info.value.filename == str(path)
    path.write_text("root: alice\n")
    assert load_aliases(str(path)) == {"root": [addr("alice")]}
