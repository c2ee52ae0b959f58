"""Tests for mailserver.tables: lookup tables behind one interface."""

from __future__ import annotations

import os

import pytest

from mailserver.tables import (
    DictTable,
    FileTable,
    PasswdTable,
    StaticTable,
    TableError,
    TableList,
    open_table,
    open_tables,
    parse_alias_text,
    parse_inline,
    parse_postmap_text,
)


def write(path, text: str, mtime: float | None = None) -> str:
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


# ---------------------------------------------------------------- static


def test_static_table_answers_every_key():
    t = open_table("static:relay.example")
    assert isinstance(t, StaticTable)
    assert t.lookup("anything") == "relay.example"
    assert t.lookup("") == "relay.example"
    assert t.spec == "static:relay.example"


def test_static_table_with_braces_keeps_spaces():
    assert open_table("static:{ error:5.7.1 go away }").lookup("x") == "error:5.7.1 go away"


def test_static_table_with_empty_value():
    assert open_table("static:").lookup("x") == ""


# ---------------------------------------------------------------- inline


def test_inline_table_basic():
    t = open_table("inline:{a=b, c=d}")
    assert isinstance(t, DictTable)
    assert t.lookup("a") == "b"
    assert t.lookup("c") == "d"
    assert t.lookup("e") is None


def test_inline_table_with_spaces_around_everything():
    t = open_table("inline:{  key1 = value one ,   key2=value2  ,  }")
    assert t.lookup("key1") == "value one"
    assert t.lookup("key2") == "value2"


def test_inline_table_keys_are_case_insensitive_values_keep_case():
    t = open_table("inline:{ User@Example.COM=Mixed/Case/ }")
    assert t.lookup("user@example.com") == "Mixed/Case/"
    assert t.lookup("USER@EXAMPLE.COM") == "Mixed/Case/"


def test_inline_table_value_may_contain_equals_and_colons():
    t = open_table("inline:{ x.test=smtp:[127.0.0.1]:2626, q=a=b }")
    assert t.lookup("x.test") == "smtp:[127.0.0.1]:2626"
    assert t.lookup("q") == "a=b"


def test_inline_table_braced_entry_keeps_spaces():
    t = open_table("inline:{ { user = text with spaces }, x=y }")
    assert t.lookup("user") == "text with spaces"
    assert t.lookup("x") == "y"


def test_inline_table_braced_entry_may_contain_a_comma():
    # Postfix: inline:{ key = value, { key = text with whitespace or comma } }
    t = open_table("inline:{ { list = a@x.test, b@x.test }, k=v }")
    assert t.lookup("list") == "a@x.test, b@x.test"
    assert t.lookup("k") == "v"


def test_empty_inline_table():
    t = open_table("inline:{}")
    assert t.lookup("a") is None
    assert open_table("inline:{ }").lookup("a") is None


@pytest.mark.parametrize("spec", ["inline:a=b", "inline:{ a=b", "inline:a=b }", "inline:{ novalue }",
                                  "inline:{ a=b, junk }"])
def test_malformed_inline_table_is_a_table_error(spec):
    with pytest.raises(TableError) as info:
        open_table(spec)
    assert spec in str(info.value)


def test_parse_inline_directly():
    assert parse_inline("{ a = 1 , b = 2 }", "inline:x") == {"a": "1", "b": "2"}


# ---------------------------------------------------------------- texthash (postmap format)


POSTMAP = """\
# transport table
example.net     smtp:[127.0.0.1]:2626

  # an indented comment line
.Sub.Example    discard:
user@x.test     error:5.1.1 this user
    has moved away
\tand left no address
key3  value  # a hash that is not at the start of a line is data
"""


def test_texthash_reads_key_value_lines(tmp_path):
    t = open_table(f"texthash:{write(tmp_path / 'transport', POSTMAP)}")
    assert isinstance(t, FileTable)
    assert t.lookup("example.net") == "smtp:[127.0.0.1]:2626"
    assert t.lookup(".sub.example") == "discard:"
    assert t.lookup(".SUB.EXAMPLE") == "discard:"


def test_texthash_continuation_lines_join_with_one_space(tmp_path):
    t = open_table(f"texthash:{write(tmp_path / 'transport', POSTMAP)}")
    assert t.lookup("user@x.test") == "error:5.1.1 this user has moved away and left no address"


def test_texthash_comments_are_whole_lines_only(tmp_path):
    t = open_table(f"texthash:{write(tmp_path / 'transport', POSTMAP)}")
    assert t.lookup("key3") == "value  # a hash that is not at the start of a line is data"
    assert t.lookup("#") is None
    assert set(t.keys()) == {"example.net", ".sub.example", "user@x.test", "key3"}


def test_texthash_later_duplicate_key_wins(tmp_path):
    t = open_table(f"texthash:{write(tmp_path / 't', 'a first' + chr(10) + 'A second' + chr(10))}")
    assert t.lookup("a") == "second"


def test_hash_type_reads_the_source_file_too(tmp_path):
    path = write(tmp_path / "virtual", "info@example.com  alice\n")
    assert open_table(f"hash:{path}").lookup("info@example.com") == "alice"


def test_texthash_line_without_value_is_a_table_error_naming_the_line(tmp_path):
    path = write(tmp_path / "t", "good value\nlonelykey\n")
    with pytest.raises(TableError) as info:
        open_table(f"texthash:{path}")
    assert f"{path}:2" in str(info.value)


def test_texthash_empty_file_is_an_empty_table(tmp_path):
    t = open_table(f"texthash:{write(tmp_path / 't', '')}")
    assert t.lookup("x") is None


def test_texthash_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "rel", "k v\n")
    t = open_table("texthash:rel")
    assert t.path == str(tmp_path / "rel")
    assert t.lookup("k") == "v"


def test_parse_postmap_text_directly():
    assert parse_postmap_text("A  b c\n  d\n#x\n") == {"a": "b c d"}


# ---------------------------------------------------------------- aliases format


ALIASES = """\
# /etc/aliases
postmaster: root
MAILER-DAEMON:postmaster
Root :  admin@example.org
team: alice,
   bob,
\tcarol
"john doe": john
"with:colon": target
list: :include:/etc/mail/list
pipe: "|/usr/bin/filter -x"
file: /var/log/mail.archive
"""


def alias_table(tmp_path):
    return open_table(f"texthash:{write(tmp_path / 'aliases', ALIASES)}", fmt="alias")


def test_aliases_format_name_colon_value(tmp_path):
    t = alias_table(tmp_path)
    assert t.lookup("postmaster") == "root"
    assert t.lookup("mailer-daemon") == "postmaster"
    assert t.lookup("root") == "admin@example.org"
    assert t.lookup("ROOT") == "admin@example.org"


def test_aliases_continuation_lines(tmp_path):
    assert alias_table(tmp_path).lookup("team") == "alice, bob, carol"


def test_aliases_quoted_names(tmp_path):
    t = alias_table(tmp_path)
    assert t.lookup("john doe") == "john"
    assert t.lookup("with:colon") == "target"


def test_aliases_values_keep_include_pipe_and_file_forms(tmp_path):
    t = alias_table(tmp_path)
    assert t.lookup("list") == ":include:/etc/mail/list"
    assert t.lookup("pipe") == '"|/usr/bin/filter -x"'
    assert t.lookup("file") == "/var/log/mail.archive"


def test_aliases_file_read_as_postmap_format_differs(tmp_path):
    # The format is chosen by the caller, not guessed.
    t = open_table(f"texthash:{write(tmp_path / 'a', 'postmaster: root' + chr(10))}")
    assert t.lookup("postmaster:") == "root"


@pytest.mark.parametrize("text, problem", [
    ("no colon here\n", "missing ':'"),
    ('"unterminated: x\n', "bad quoted alias name"),
    ('"name" x\n', "bad quoted alias name"),
    (": value\n", "empty alias name"),
    ('"": value\n', "empty alias name"),
])
def test_bad_alias_lines_are_table_errors(text, problem):
    with pytest.raises(TableError) as info:
        parse_alias_text(text, "/etc/aliases")
    assert problem in str(info.value)
    assert "/etc/aliases:1" in str(info.value)


def test_alias_error_reports_the_logical_line_number():
    with pytest.raises(TableError) as info:
        parse_alias_text("# c\na: b\n\nbroken\n", "aliases")
    assert "aliases:4" in str(info.value)


# ---------------------------------------------------------------- missing files and bad specs


def test_missing_file_is_an_empty_table_with_a_warning(tmp_path):
    warnings = []
    path = str(tmp_path / "absent")
    t = open_table(f"texthash:{path}", warn=warnings.append)
    assert t.lookup("anything") is None
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: ") and path in warnings[0]


def test_unreadable_path_is_a_table_error(tmp_path):
    with pytest.raises(TableError):
        open_table(f"texthash:{tmp_path}")  # a directory


@pytest.mark.parametrize("spec", ["noseparator", "ldap:/etc/ldap.cf", "mysql:/etc/m.cf", "unix:group.byname", ":x"])
def test_bad_or_unsupported_spec_is_a_table_error(spec):
    with pytest.raises(TableError):
        open_table(spec)


def test_unix_passwd_table_knows_root():
    t = open_table("unix:passwd.byname")
    assert isinstance(t, PasswdTable)
    entry = t.lookup("root")
    assert entry is not None and entry.startswith("root:x:0:")
    assert t.lookup("no-such-user-hopefully-xyz") is None


# ---------------------------------------------------------------- TableList


def test_table_list_first_match_wins_in_order():
    tl = open_tables(["inline:{ a=first }", "inline:{ a=second, b=only-second }", "static:fallback"])
    assert tl.lookup("a") == "first"
    assert tl.lookup("b") == "only-second"
    assert tl.lookup("zzz") == "fallback"


def test_table_list_without_match_is_none():
    tl = open_tables(["inline:{ a=1 }", "inline:{ b=2 }"])
    assert tl.lookup("c") is None


def test_table_list_truthiness_and_empty_specs():
    assert not open_tables([])
    assert not open_tables(["", ""])
    assert open_tables(["static:x"])
    assert TableList([]).lookup("x") is None


def test_open_tables_passes_format_and_warn(tmp_path):
    warnings = []
    path = write(tmp_path / "aliases", "root: admin\n")
    tl = open_tables([f"texthash:{path}", f"texthash:{tmp_path}/missing"], fmt="alias", warn=warnings.append)
    assert tl.lookup("root") == "admin"
    assert len(warnings) == 1


def test_open_tables_bad_spec_raises():
    with pytest.raises(TableError):
        open_tables(["inline:{ a=b }", "bogus"])


# ---------------------------------------------------------------- reload


def test_reload_if_changed_rereads_a_rewritten_file(tmp_path):
    path = tmp_path / "t"
    write(path, "k old\n", mtime=1_600_000_000)
    t = open_table(f"texthash:{path}")
    assert t.lookup("k") == "old"
    assert t.reload_if_changed() is False
    write(path, "k new\nk2 added\n", mtime=1_600_000_100)
    assert t.reload_if_changed() is True
    assert t.lookup("k") == "new"
    assert t.lookup("k2") == "added"
    assert t.reload_if_changed() is False


def test_reload_does_not_notice_a_change_with_the_same_mtime(tmp_path):
    path = tmp_path / "t"
    write(path, "k old\n", mtime=1_600_000_000)
    t = open_table(f"texthash:{path}")
    write(path, "k new\n", mtime=1_600_000_000)
    assert t.reload_if_changed() is False
    assert t.lookup("k") == "old"


def test_reload_after_the_file_disappears_and_reappears(tmp_path):
    warnings = []
    path = tmp_path / "t"
    write(path, "k v\n", mtime=1_600_000_000)
    t = open_table(f"texthash:{path}", warn=warnings.append)
    os.unlink(path)
    assert t.reload_if_changed() is True
    assert t.lookup("k") is None
    assert len(warnings) == 1
    write(path, "k back\n", mtime=1_600_000_200)
    assert t.reload_if_changed() is True
    assert t.lookup("k") == "back"


def test_reload_of_a_file_created_after_start(tmp_path):
    path = tmp_path / "later"
    t = open_table(f"texthash:{path}")
    assert t.lookup("k") is None
    write(path, "k v\n", mtime=1_600_000_000)
    assert t.reload_if_changed() is True
    assert t.lookup("k") == "v"


def test_table_list_reload_reloads_file_tables_only(tmp_path):
    path = tmp_path / "aliases"
    write(path, "root: old\n", mtime=1_600_000_000)
    tl = open_tables(["inline:{ x=y }", f"texthash:{path}", "static:z"], fmt="alias")
    write(path, "root: new\n", mtime=1_600_000_500)
    tl.reload_if_changed()
    assert tl.lookup("root") == "new"
    assert tl.lookup("x") == "y"

