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
    assert t.reload_if_changed() is False  # kept: a vanished file is not an empty table
    assert t.lookup("k") == "v"
    assert len(warnings) == 1 and "disappeared; keeping the previous version" in warnings[0]
    write(path, "k back\n", mtime=1_600_000_200)
    assert t.reload_if_changed() is True
    assert t.lookup("k") == "back"


@pytest.mark.parametrize("kind, text, key, value, back", [
    ("regexp", "/^blocked\\./ REJECT\n", "blocked.example", "REJECT", "/^blocked\\./ OK\n"),
    ("pcre", "/^blocked\\./ REJECT\n", "blocked.example", "REJECT", "/^blocked\\./ OK\n"),
    ("cidr", "192.0.2.0/24 REJECT\n", "192.0.2.7", "REJECT", "192.0.2.0/24 OK\n"),
    ("hash", "blocked.example REJECT\n", "blocked.example", "REJECT", "blocked.example OK\n"),
])
def test_every_file_table_keeps_its_contents_when_its_file_disappears(tmp_path, kind, text, key, value, back):
    """One rule for every file table (texthash: above): a vanished file is
    not an empty table (a vanished access or cidr list would permit what it
    refused); one warning; the file's return is read."""
    warnings = []
    path = write(tmp_path / "access", text, mtime=1_600_000_000)
    t = open_table(f"{kind}:{path}", warn=warnings.append)
    try:
        for extra in ("", ".db"):  # (hash: the index goes too)
            if os.path.exists(path + extra):
                os.unlink(path + extra)
        assert t.reload_if_changed() is False
        assert t.lookup(key) == value
        assert t.reload_if_changed() is False and t.lookup(key) == value
        assert len(warnings) == 1 and "disappeared; keeping the previous version" in warnings[0]
        write(tmp_path / "access", back, mtime=1_600_000_200)
        assert t.reload_if_changed() is True
        assert t.lookup(key) == "OK"
    finally:
        getattr(t, "close", lambda: None)()


def test_an_unreadable_file_keeps_the_previous_contents_and_is_reported_once(tmp_path):
    path = tmp_path / "t"
    write(path, "k v\n", mtime=1_600_000_000)
    t = open_table(f"texthash:{path}")
    os.unlink(path)
    os.mkdir(path)  # (root reads any file: a directory is what cannot be read here)
    with pytest.raises(TableError, match="cannot read"):
        t.reload_if_changed()
    assert t.reload_if_changed() is False  # the same version of the file: no second error
    assert t.lookup("k") == "v"


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



# ================================================================ regexp: (regexp_table(5))

import sqlite3  # noqa: E402

from mailserver.tables import (  # noqa: E402
    CidrTable,
    CompositeTable,
    HashTable,
    RegexpTable,
    SqliteTable,
    TableLookupError,
    compile_sql_query,
    compile_table,
    query_table,
    translate_pcre,
    translate_posix_regex,
)


def regexp_table(tmp_path, text: str, kind: str = "regexp", warnings: list | None = None):
    path = write(tmp_path / f"t.{kind}", text)
    return open_table(f"{kind}:{path}", warn=(warnings.append if warnings is not None else lambda s: None))


def table_error(tmp_path, text: str, kind: str = "regexp") -> str:
    path = write(tmp_path / f"bad.{kind}", text)
    with pytest.raises(TableError) as info:
        open_table(f"{kind}:{path}")
    return str(info.value)


def test_regexp_table_first_match_wins_and_no_match_is_none(tmp_path):
    t = regexp_table(tmp_path, "/^a/ first\n/^ab/ second\n/b$/ third\n")
    assert isinstance(t, RegexpTable)
    assert t.lookup("abc") == "first"
    assert t.lookup("xb") == "third"
    assert t.lookup("zzz") is None


def test_regexp_matching_is_case_insensitive_by_default_and_i_toggles_it(tmp_path):
    # regexp_table(5): "i  Toggle the case sensitivity flag. By default, matching is case-insensitive."
    t = regexp_table(tmp_path, "/^Subject: hello/i sensitive\n/^subject: hello/ insensitive\n")
    assert t.lookup("Subject: hello") == "sensitive"
    assert t.lookup("SUBJECT: HELLO") == "insensitive"


def test_regexp_keys_are_not_lower_cased_before_substitution(tmp_path):
    t = regexp_table(tmp_path, "/^(.*)@Example\\.COM$/ user=$1\n")
    assert t.lookup("John.Doe@example.com") == "user=John.Doe"


def test_regexp_negation(tmp_path):
    t = regexp_table(tmp_path, "!/^local-/ remote\n/./ local\n")
    assert t.lookup("other") == "remote"
    assert t.lookup("local-x") == "local"
    assert regexp_table(tmp_path, "!!/^a/ double-negation\n").lookup("abc") == "double-negation"


def test_regexp_if_endif_blocks_nest(tmp_path):
    t = regexp_table(tmp_path, """\
if /@example\\.com$/
if !/^postmaster@/
/^(a.*)@/ starts-with-a $1
endif
/./ example-other
endif
/./ elsewhere
""")
    assert t.lookup("alice@example.com") == "starts-with-a alice"
    assert t.lookup("postmaster@example.com") == "example-other"
    assert t.lookup("bob@example.com") == "example-other"
    assert t.lookup("alice@example.org") == "elsewhere"


def test_regexp_group_substitution_forms(tmp_path):
    t = regexp_table(tmp_path, "/^(\\w+)-(\\w*)-(x)?$/ 1=$1 2=${2}! 3=$(3) cost=$$5\n")
    assert t.lookup("ab-cd-x") == "1=ab 2=cd! 3=x cost=$5"
    assert t.lookup("ab--") == "1=ab 2=! 3= cost=$5"  # an empty or unmatched group is empty


def test_regexp_comments_blank_lines_and_continuation_lines(tmp_path):
    t = regexp_table(tmp_path, """\
# comment
/^a/ REJECT this text
    continues here

   # indented comment
/^b/ second
""")
    # readlline(3): continuation text is appended exactly as written
    assert t.lookup("a") == "REJECT this text    continues here"
    assert t.lookup("b") == "second"


def test_regexp_dot_matches_newline_unless_m_flag(tmp_path):
    t = regexp_table(tmp_path, "/^Subject: a.b$/ default\n")
    assert t.lookup("Subject: a\nb") == "default"
    assert t.lookup("Subject: a\nb\n") is None  # POSIX '$' is the very end
    t = regexp_table(tmp_path, "/^b$/m newline-mode\n/[^x]y/m class\n")
    assert t.lookup("Subject: a\nb\nc") == "newline-mode"
    assert t.lookup("\ny") is None  # REG_NEWLINE: a non-matching list never matches newline


def test_regexp_x_flag_selects_basic_regular_expressions(tmp_path):
    t = regexp_table(tmp_path, "/^\\(ab\\)\\{2\\}+$/x bre $1\n")
    assert t.lookup("abab+") == "bre ab"
    assert t.lookup("ababab") is None


def test_regexp_posix_bracket_classes_and_gnu_word_boundaries(tmp_path):
    t = regexp_table(tmp_path, "/^[[:digit:]]+[[:space:]]*$/ digits\n/\\<cat\\>/ word\n/[\\.]x/ bracket\n")
    assert t.lookup("123 ") == "digits"
    assert t.lookup("a cat sat") == "word"
    assert t.lookup("concatenate") is None
    assert t.lookup("\\x") == "bracket"  # backslash is literal inside POSIX brackets


def test_regexp_backslash_letter_is_literal_as_in_posix_with_a_warning(tmp_path):
    warnings = []
    t = regexp_table(tmp_path, "/^\\d$/ d\n", warnings=warnings)
    assert t.lookup("d") == "d"
    assert t.lookup("5") is None
    assert any(":1:" in w and "literal" in w for w in warnings)


def test_regexp_legacy_second_pattern(tmp_path):
    t = regexp_table(tmp_path, "/^a/!/b$/ a-not-b\n")
    assert t.lookup("ac") == "a-not-b"
    assert t.lookup("ab") is None


def test_regexp_rule_without_result_uses_empty_string_with_warning(tmp_path):
    warnings = []
    t = regexp_table(tmp_path, "/^a/\n", warnings=warnings)
    assert t.lookup("a") == ""
    assert "no replacement text" in warnings[0]


@pytest.mark.parametrize("text, line, problem", [
    ("/a/ ok\n/b/q x\n", 2, 'unknown regexp option "q"'),
    ("/a/ ok\n/b x\n", 2, "no closing regexp delimiter"),
    ("endif\n", 1, "ENDIF without matching IF"),
    ("/a/ ok\nif /b/\n/c/ d\n", 2, "IF has no matching ENDIF"),
    ("if /b/\n  /c/ d\nendif\n", 1, "extra text after IF"),
    ("/(a)/ $2\n", 1, "out of range replacement index"),
    ("!/(a)/ $1\n", 1, "negative match"),
    ("/a/ $name\n", 1, "non-numeric replacement index"),
    ("/a/ cost $\n", 1, "bad replacement syntax"),
    ("/a/ ${1\n", 1, "unbalanced"),
    ("/(?i)a/ x\n", 1, "not POSIX"),
    ("/a[/ x\n", 1, "pattern"),
    ("hello world\n", 1, "unrecognized request"),
])
def test_regexp_errors_name_file_and_line(tmp_path, text, line, problem):
    message = table_error(tmp_path, text)
    assert f"{tmp_path / 'bad.regexp'}:{line}:" in message
    assert problem in message


def test_regexp_missing_file_is_empty_with_warning_and_reload_picks_it_up(tmp_path):
    warnings = []
    path = tmp_path / "later.regexp"
    t = open_table(f"regexp:{path}", warn=warnings.append)
    assert t.lookup("a") is None and len(warnings) == 1
    write(path, "/a/ found\n", mtime=1_600_000_000)
    assert t.reload_if_changed() is True
    assert t.lookup("a") == "found"
    assert t.reload_if_changed() is False


def test_regexp_reload_keeps_the_previous_rules_when_the_new_file_is_broken(tmp_path):
    warnings = []
    path = tmp_path / "t.regexp"
    write(path, "/a/ old\n", mtime=1_600_000_000)
    t = open_table(f"regexp:{path}", warn=warnings.append)
    write(path, "/a/ new\n/b/ (\n/c/ $9\n", mtime=1_600_000_100)
    assert t.reload_if_changed() is True
    assert t.lookup("a") == "old"
    assert "keeping the previous version" in warnings[-1] and f"{path}:3" in warnings[-1]
    write(path, "/a/ fixed\n", mtime=1_600_000_200)
    assert t.reload_if_changed() is True
    assert t.lookup("a") == "fixed"


def test_regexp_rules_are_compiled_once_at_open(tmp_path):
    path = tmp_path / "t.regexp"
    write(path, "/a/ compiled\n", mtime=1_600_000_000)
    t = open_table(f"regexp:{path}")
    write(path, "/a/ changed\n", mtime=1_600_000_000)
    os.utime(path, (1_600_000_000, 1_600_000_000))
    assert t.lookup("a") == "compiled"


def test_inline_regexp_rules(tmp_path):
    t = open_table("regexp:{ {/^a,b/ comma rule}, {/^c/ REJECT go away} }")
    assert t.lookup("a,bc") == "comma rule"
    assert t.lookup("cat") == "REJECT go away"
    with pytest.raises(TableError) as info:
        open_table("regexp:{ {/^a/ ok}, {/b/q x} }")
    assert "rule 2" in str(info.value)


def test_translate_posix_regex_details():
    assert translate_posix_regex("a$") == "a\\Z"
    assert translate_posix_regex("a$", newline=True) == "a$"
    assert translate_posix_regex("[^a]", newline=True) == "[^a\\n]"
    assert translate_posix_regex("[]a-]") == "[\\]a\\-]"
    assert translate_posix_regex("*a\\(b\\)c\\{1,2\\}", basic=True) == "\\*a(b)c{1,2}"


# ================================================================ pcre: (pcre_table(5))


def test_pcre_defaults_are_caseless_and_dotall(tmp_path):
    t = regexp_table(tmp_path, "/^subject:.*free/ hit\n", kind="pcre")
    assert t.lookup("SUBJECT: get it\n FREE") == "hit"


@pytest.mark.parametrize("rule, key, expected", [
    ("/^abc$/i x", "ABC", None),          # i: case-sensitive
    ("/^abc$/i x", "abc", "x"),
    ("/a.b/s x", "a\nb", None),           # s: dot no longer matches newline
    ("/^b$/m x", "a\nb\nc", "x"),         # m: multiline anchors
    ("/a b c/x x", "abc", "x"),           # x: extended
    ("/b/A x", "ab", None),               # A: anchored
    ("/b/A x", "ba", "x"),
    ("/a$/ x", "a\n", "x"),               # $ also before a final newline...
    ("/a$/E x", "a\n", None),             # ...except with E (dollar end only)
    ("/<(.+)>/ $1", "<a> <b>", "a> <b"),  # greedy by default
    ("/<(.+)>/U $1", "<a> <b>", "a"),     # U: ungreedy
    ("/<(.+?)>/U $1", "<a> <b>", "a> <b"),
    ("/x/X y", "x", "y"),                 # X: obsolete, ignored
])
def test_pcre_flags(tmp_path, rule, key, expected):
    assert regexp_table(tmp_path, rule + "\n", kind="pcre").lookup(key) == expected


def test_pcre_syntax_subset_is_translated(tmp_path):
    t = regexp_table(tmp_path, r"""
/^(?<user>[^@]+)@(?P<dom>.+)\z/ $2:$1
/^\Qa.b*c\E$/ quoted
/^foo(?-i)BAR$/ inline-off
/(?<=x)\d+/ lookbehind
/^(?>a+)b/ atomic
/^[[:alpha:][:digit:]]+\h+\d$/ posix
/^\x{41}\e/ escapes
""".lstrip(), kind="pcre")
    assert t.lookup("joe@example.com") == "example.com:joe"
    assert t.lookup("A.B*C") == "quoted"
    assert t.lookup("aXbXc") is None
    assert t.lookup("FOOBAR") == "inline-off"
    assert t.lookup("fooBar") is None
    assert t.lookup("x123") == "lookbehind"
    assert t.lookup("aaab") == "atomic"
    assert t.lookup("zz1 \t7") == "posix"
    assert t.lookup("a\x1b") == "escapes"


def test_pcre_mid_pattern_option_applies_to_later_branches():
    # PCRE: (a(?i)b|c) matches "ab", "aB", "c" and "C"
    assert translate_pcre("a(?i)b|c") == "a(?i:b)|(?i:c)"
    assert translate_pcre("(a(?-i)b|c)d") == "(a(?-i:b)|(?-i:c))d"


@pytest.mark.parametrize("pattern, problem", [
    ("(?R)", "recursion"),
    ("(a)(?1)", "recursion"),
    ("(?&name)", "subroutines"),
    ("a\\Kb", "\\K"),
    ("\\p{L}", "\\p"),
    ("(*UTF)a", "VERB"),
    ("(?|a)", "branch reset"),
    ("(?J)a", "inline option"),
    ("[[:^alpha:]]", "not supported"),
    ("(a", "parenthesis"),
    ("a)", "parenthesis"),
])
def test_pcre_constructs_python_cannot_express_are_table_errors(tmp_path, pattern, problem):
    message = table_error(tmp_path, f"/ok/ ok\n/{pattern}/ x\n", kind="pcre")
    assert f"{tmp_path / 'bad.pcre'}:2:" in message
    assert problem in message


def test_pcre_if_endif_and_negation(tmp_path):
    t = regexp_table(tmp_path, "if !/^X-/\n/^Subject:/ subject\nendif\n/^X-/ x-header\n", kind="pcre")
    assert t.lookup("Subject: a") == "subject"
    assert t.lookup("X-Subject: a") == "x-header"


def test_inline_pcre_table():
    t = open_table("pcre:{ {/^(\\d+)$/ number $1}, {!/./ empty} }")
    assert t.lookup("42") == "number 42"
    assert t.lookup("") == "empty"
    assert t.lookup("x") is None


# ================================================================ cidr: (cidr_table(5))

CIDR = """\
# order matters
192.168.1.1         exact
192.168.0.0/16      private16
10.0.0.0/8          ten
0.0.0.0/0           any-v4
[::1]/128           loopback-v6
[2001:db8::/32]     doc-v6
2001:db8:1::/48     never-reached
::/0                any-v6
"""


def test_cidr_first_match_in_file_order(tmp_path):
    t = open_table(f"cidr:{write(tmp_path / 't.cidr', CIDR)}")
    assert isinstance(t, CidrTable)
    assert t.lookup("192.168.1.1") == "exact"
    assert t.lookup("192.168.1.2") == "private16"
    assert t.lookup("10.255.0.1") == "ten"
    assert t.lookup("8.8.8.8") == "any-v4"
    assert t.lookup("::1") == "loopback-v6"
    assert t.lookup("2001:db8:1::5") == "doc-v6"
    assert t.lookup("2001:db9::1") == "any-v6"


def test_cidr_keys_that_are_not_addresses_do_not_match(tmp_path):
    t = open_table(f"cidr:{write(tmp_path / 't.cidr', CIDR)}")
    for key in ("", "example.com", "[192.168.1.1]", "192.168.1", "1.2.3.4/32", "::1%lo"):
        assert t.lookup(key) is None


def test_cidr_families_do_not_mix(tmp_path):
    t = open_table(f"cidr:{write(tmp_path / 't.cidr', '0.0.0.0/0 v4' + chr(10))}")
    assert t.lookup("::ffff:1.2.3.4") is None
    assert t.lookup("1.2.3.4") == "v4"


CIDR_BLOCKS = """\
if 10.0.0.0/8
!10.1.0.0/16  ten-but-not-10.1
endif
if ![fe80::]/10
::/0          global-v6
endif
0.0.0.0/0     other
"""


def test_cidr_negation_and_if_endif(tmp_path):
    t = open_table(f"cidr:{write(tmp_path / 't.cidr', CIDR_BLOCKS)}")
    assert t.lookup("10.2.3.4") == "ten-but-not-10.1"
    assert t.lookup("10.1.2.3") == "other"
    assert t.lookup("2001:db8::1") == "global-v6"
    assert t.lookup("fe80::1") is None
    assert t.lookup("::1") == "global-v6"


@pytest.mark.parametrize("text, problem", [
    ("10.0.0.1/8 x\n", 'perhaps you should use "10.0.0.0/8" instead'),
    ("10.0.0.0/33 x\n", "bad net/mask pattern"),
    ("10.0.0.0/x x\n", "bad net/mask pattern"),
    ("300.1.1.1 x\n", "bad address pattern"),
    ("10.0.0.0/8\n", "no lookup result"),
    ("[10.0.0.0/8 x\n", "missing ']'"),
    ("[::1]x x\n", "garbage after"),
    ("endif\n", "ENDIF without matching IF"),
    ("if 10.0.0.0/8\n", "IF has no matching ENDIF"),
    ("if 10.0.0.0/8\n  10.1.0.0/16 x\nendif\n", "extra text after IF"),
])
def test_cidr_errors_name_file_and_line(tmp_path, text, problem):
    message = table_error(tmp_path, text, kind="cidr")
    assert f"{tmp_path / 'bad.cidr'}:1:" in message
    assert problem in message


def test_inline_cidr_table():
    t = open_table("cidr:{ {127.0.0.0/8 loopback}, {[::1] loopback6} }")
    assert t.lookup("127.0.0.2") == "loopback"
    assert t.lookup("::1") == "loopback6"


def test_cidr_reload_if_changed(tmp_path):
    path = tmp_path / "t.cidr"
    write(path, "10.0.0.0/8 old\n", mtime=1_600_000_000)
    t = open_table(f"cidr:{path}")
    write(path, "10.0.0.0/8 new\n", mtime=1_600_000_100)
    assert t.reload_if_changed() is True
    assert t.lookup("10.0.0.1") == "new"


# ================================================================ hash: (SQLite index)


def index_rows(db_path) -> dict:
    conn = sqlite3.connect(db_path)
    try:
        return {bytes(k).decode(): bytes(v).decode() for k, v in conn.execute("SELECT key, value FROM map")}
    finally:
        conn.close()


def test_compile_table_writes_an_sqlite_index_next_to_the_source(tmp_path):
    path = write(tmp_path / "virtual", "Info@Example.com  alice\nsales@example.com bob, carol\n")
    db = compile_table(f"hash:{path}")
    assert db == path + ".db"
    assert index_rows(db) == {"info@example.com": "alice", "sales@example.com": "bob, carol"}
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_hash_lookups_come_from_the_index_not_the_source(tmp_path):
    path = write(tmp_path / "virtual", "info@example.com alice\n", mtime=1_600_000_000)
    t = open_table(f"hash:{path}")
    assert isinstance(t, HashTable) and not t.in_memory
    os.unlink(path)  # Postfix never reads the source of a hash: table either
    t2 = open_table(f"hash:{path}")
    assert t2.lookup("INFO@example.com") == "alice"
    assert t2.lookup("nobody@example.com") is None
    t.close()
    t2.close()


def test_hash_index_is_rebuilt_on_open_when_the_source_is_newer(tmp_path):
    path = write(tmp_path / "transport", "a.example smtp:[10.0.0.1]\n", mtime=1_600_000_000)
    compile_table(f"hash:{path}")
    os.utime(path + ".db", (1_600_000_050, 1_600_000_050))
    write(tmp_path / "transport", "a.example smtp:[10.0.0.2]\n", mtime=1_600_000_100)
    t = open_table(f"hash:{path}")
    assert t.lookup("a.example") == "smtp:[10.0.0.2]"
    assert index_rows(path + ".db") == {"a.example": "smtp:[10.0.0.2]"}
    t.close()


def test_hash_reload_if_changed_rebuilds_the_index(tmp_path):
    path = write(tmp_path / "transport", "a.example one\n", mtime=1_600_000_000)
    t = open_table(f"hash:{path}")
    assert t.reload_if_changed() is False
    write(tmp_path / "transport", "a.example two\nb.example three\n", mtime=1_600_000_100)
    assert t.reload_if_changed() is True
    assert t.lookup("a.example") == "two"
    assert t.lookup("b.example") == "three"
    assert t.reload_if_changed() is False
    assert sorted(t.keys()) == ["a.example", "b.example"]
    t.close()


def test_hash_reopens_an_index_rebuilt_by_another_process(tmp_path):
    path = write(tmp_path / "transport", "a.example one\n", mtime=1_600_000_000)
    t = open_table(f"hash:{path}")
    write(tmp_path / "transport", "a.example two\n", mtime=1_600_000_100)
    compile_table(f"hash:{path}")  # `mailserver map` run by the administrator
    assert t.reload_if_changed() is True
    assert t.lookup("a.example") == "two"
    t.close()


def test_hash_index_for_alias_format(tmp_path):
    path = write(tmp_path / "aliases", ALIASES)
    db = compile_table(f"hash:{path}", fmt="alias")
    assert index_rows(db)["team"] == "alice, bob, carol"
    t = open_table(f"hash:{path}", fmt="alias")
    assert t.lookup("Postmaster") == "root"
    assert t.lookup('john doe') == "john"
    t.close()
    # the same source opened in the other format gets a rebuilt index
    other = write(tmp_path / "simple", "root: admin\n")
    open_table(f"hash:{other}", fmt="alias").close()
    t = open_table(f"hash:{other}")
    assert t.lookup("root:") == "admin"
    t.close()


def test_compile_table_reports_a_bad_source_line(tmp_path):
    path = write(tmp_path / "t", "good value\nlonelykey\n")
    with pytest.raises(TableError) as info:
        compile_table(f"hash:{path}")
    assert f"{path}:2" in str(info.value)
    assert not os.path.exists(path + ".db")
    with pytest.raises(TableError):
        compile_table(f"hash:{tmp_path / 'missing'}")


def test_hash_reload_with_a_broken_source_keeps_the_old_index(tmp_path):
    warnings = []
    path = write(tmp_path / "t", "k old\n", mtime=1_600_000_000)
    t = open_table(f"hash:{path}", warn=warnings.append)
    write(tmp_path / "t", "k new\nbroken\n", mtime=1_600_000_100)
    assert t.reload_if_changed() is True
    assert t.lookup("k") == "old"
    assert f"{path}:2" in warnings[-1] and "keeping the previous version" in warnings[-1]
    t.close()


def test_hash_never_replaces_a_db_file_it_did_not_write(tmp_path):
    warnings = []
    path = write(tmp_path / "aliases", "root: admin\n")
    foreign = b"\x00\x06\x15\x61" + b"\x00" * 60  # e.g. a Berkeley DB hash file
    (tmp_path / "aliases.db").write_bytes(foreign)
    t = open_table(f"hash:{path}", fmt="alias", warn=warnings.append)
    assert t.in_memory and t.lookup("root") == "admin"
    assert (tmp_path / "aliases.db").read_bytes() == foreign
    assert "not replacing" in warnings[0]
    compile_table(f"hash:{path}", fmt="alias")  # an explicit compile does replace it
    assert index_rows(path + ".db") == {"root": "admin"}


def test_hash_falls_back_to_memory_when_the_index_cannot_be_written(tmp_path, monkeypatch):
    import mailserver.tables as tables

    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tables, "_write_index", refuse)
    warnings = []
    path = write(tmp_path / "t", "k v\n")
    t = open_table(f"hash:{path}", warn=warnings.append)
    assert t.in_memory and t.lookup("K") == "v"
    assert "Permission denied" in warnings[0]


def test_hash_keeps_8bit_bytes_exactly(tmp_path):
    path = tmp_path / "t"
    path.write_bytes(b"caf\xe9 latin1-key\nkey \xff\xfe-value\n")
    t = open_table(f"hash:{path}")
    assert t.lookup("key").encode("utf-8", "surrogateescape") == b"\xff\xfe-value"
    assert t.lookup(b"caf\xe9".decode("utf-8", "surrogateescape")) == "latin1-key"
    t.close()


def test_hash_missing_source_and_index_is_empty_with_warning(tmp_path):
    warnings = []
    t = open_table(f"hash:{tmp_path / 'none'}", warn=warnings.append)
    assert t.lookup("x") is None and t.missing
    assert len(warnings) == 1


def test_texthash_stays_in_memory(tmp_path):
    path = write(tmp_path / "t", "k v\n")
    t = open_table(f"texthash:{path}")
    assert isinstance(t, FileTable)
    assert not os.path.exists(path + ".db")


# ================================================================ sqlite: (sqlite_table(5))


@pytest.fixture
def sqlite_db(tmp_path):
    db = tmp_path / "mail.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE aliases (alias TEXT, forw TEXT, active INTEGER);
        INSERT INTO aliases VALUES ('info@example.com', 'alice@example.com', 1);
        INSERT INTO aliases VALUES ('sales@example.com', 'bob@example.com', 1);
        INSERT INTO aliases VALUES ('sales@example.com', 'carol@example.com', 1);
        INSERT INTO aliases VALUES ('old@example.com', 'gone@example.com', 0);
        INSERT INTO aliases VALUES ('x'' or ''1''=''1', 'literal-quote-key', 1);
        CREATE TABLE domains (domain TEXT, transport TEXT);
        INSERT INTO domains VALUES ('example.com', 'virtual:');
    """)
    conn.commit()
    conn.close()
    return db


def sqlite_cf(tmp_path, db, query: str, extra: str = "") -> str:
    return write(tmp_path / "map.cf", f"# sqlite table\ndbpath = {db}\nquery = {query}\n{extra}")


def test_sqlite_table_query_with_s_expansion(tmp_path, sqlite_db):
    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT forw FROM aliases WHERE alias='%s' AND active = 1")
    t = open_table(f"sqlite:{cf}")
    assert isinstance(t, SqliteTable)
    assert t.lookup("INFO@example.com") == "alice@example.com"  # keys are folded
    assert t.lookup("sales@example.com") == "bob@example.com,carol@example.com"
    assert t.lookup("old@example.com") is None
    assert t.lookup("nobody@example.com") is None
    t.close()


@pytest.mark.parametrize("key", ["' OR '1'='1", "x' OR '1'='1' --", "'; DROP TABLE aliases; --",
                                 "%' OR alias LIKE '%", "\\' OR 1=1 --"])
def test_sqlite_injection_attempts_match_nothing(tmp_path, sqlite_db, key):
    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT forw FROM aliases WHERE alias='%s'")
    t = open_table(f"sqlite:{cf}")
    assert t.lookup(key) is None
    t.close()
    conn = sqlite3.connect(sqlite_db)
    assert conn.execute("SELECT count(*) FROM aliases").fetchone() == (5,)
    conn.close()


def test_sqlite_a_key_with_quotes_is_compared_as_plain_text(tmp_path, sqlite_db):
    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT forw FROM aliases WHERE alias='%s'")
    t = open_table(f"sqlite:{cf}")
    assert t.lookup("x' or '1'='1") == "literal-quote-key"
    t.close()


def test_sqlite_u_and_d_expansions_inside_one_literal(tmp_path, sqlite_db):
    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT forw FROM aliases WHERE alias = '%u@%d' AND '%%' = '%%'")
    sql, params = compile_sql_query("SELECT forw FROM aliases WHERE alias = '%u@%d' AND '%%' = '%%'")
    assert sql == "SELECT forw FROM aliases WHERE alias = (? || ? || ?) AND '%' = '%'"
    t = open_table(f"sqlite:{cf}")
    assert t.lookup("info@example.com") == "alice@example.com"
    assert t.lookup("info") is None  # %d without a domain suppresses the query
    assert t.lookup("@example.com") is None  # an empty local part too
    t.close()


def test_sqlite_domain_labels_result_format_and_domain_list(tmp_path, sqlite_db):
    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT transport FROM domains WHERE domain = '%2.%1'",
                   "result_format = %s%S\ndomain = example.com, hash:/nonexistent/x\n")
    t = open_table(f"sqlite:{cf}")
    assert t.lookup("user@example.com") == "virtual:user@example.com"
    assert t.lookup("user@other.com") is None  # not in the domain list: no query
    assert t.lookup("example.com") is None  # not an address: no query
    t.close()


def test_sqlite_result_format_u_and_d_of_the_value(tmp_path, sqlite_db):
    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT forw FROM aliases WHERE alias='%s'", "result_format = <%u> at %d\n")
    t = open_table(f"sqlite:{cf}")
    assert t.lookup("info@example.com") == "<alice> at example.com"
    t.close()


def test_sqlite_legacy_query_parameters(tmp_path, sqlite_db):
    cf = write(tmp_path / "legacy.cf", f"dbpath = {sqlite_db}\ntable = aliases\nselect_field = forw\n"
                                        "where_field = alias\nadditional_conditions = AND active = 1\n")
    t = open_table(f"sqlite:{cf}")
    assert t.lookup("info@example.com") == "alice@example.com"
    t.close()


def test_sqlite_expansion_limit_is_a_temporary_lookup_error(tmp_path, sqlite_db):
    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT forw FROM aliases WHERE alias='%s'", "expansion_limit = 1\n")
    t = open_table(f"sqlite:{cf}")
    assert t.lookup("info@example.com") == "alice@example.com"
    with pytest.raises(TableLookupError):
        t.lookup("sales@example.com")
    t.close()


def test_sqlite_database_is_opened_read_only(tmp_path, sqlite_db):
    cf = sqlite_cf(tmp_path, sqlite_db, "DELETE FROM aliases WHERE alias='%s'")
    t = open_table(f"sqlite:{cf}")
    with pytest.raises(TableLookupError):
        t.lookup("info@example.com")
    t.close()
    conn = sqlite3.connect(sqlite_db)
    assert conn.execute("SELECT count(*) FROM aliases").fetchone() == (5,)
    conn.close()


@pytest.mark.parametrize("body, problem", [
    ("query = SELECT 1\n", "missing dbpath"),
    ("dbpath = {db}\n", "missing query"),
    ("dbpath = {db}\nquery = SELECT forw FROM nosuchtable WHERE alias='%s'\n", "no such table"),
    ("dbpath = {db}\nquery = SELECT forw FROM aliases WHERE alias='%x'\n", "invalid %x"),
    ("dbpath = {db}\nquery = SELECT 1; DELETE FROM aliases\n", "one statement"),
    ("dbpath = {db}\nquery = SELECT forw FROM aliases WHERE alias='%s\n", "unterminated"),
    ("dbpath = {tmp}/absent.sqlite\nquery = SELECT 1\n", "cannot open database"),
    ("dbpath = {db}\nquery\n", "missing '='"),
])
def test_sqlite_configuration_errors(tmp_path, sqlite_db, body, problem):
    cf = write(tmp_path / "bad.cf", body.format(db=sqlite_db, tmp=tmp_path))
    with pytest.raises(TableError) as info:
        open_table(f"sqlite:{cf}")
    assert problem in str(info.value)


def test_sqlite_reload_rereads_the_configuration(tmp_path, sqlite_db):
    cf = tmp_path / "map.cf"
    write(cf, f"dbpath = {sqlite_db}\nquery = SELECT forw FROM aliases WHERE alias='%s'\n", mtime=1_600_000_000)
    t = open_table(f"sqlite:{cf}")
    write(cf, f"dbpath = {sqlite_db}\nquery = SELECT upper(forw) FROM aliases WHERE alias='%s'\n",
          mtime=1_600_000_100)
    assert t.reload_if_changed() is True
    assert t.lookup("info@example.com") == "ALICE@EXAMPLE.COM"
    t.close()


# ================================================================ unionmap: and pipemap:


def test_unionmap_joins_every_answer(tmp_path):
    path = write(tmp_path / "t.regexp", "/^a/ from-regexp\n")
    t = open_table(f"unionmap:{{inline:{{a=one, b=two}}, regexp:{path}, static:{{with space}}}}")
    assert isinstance(t, CompositeTable)
    assert t.lookup("a") == "one,from-regexp,with space"
    assert t.lookup("z") == "with space"
    assert open_table("unionmap:{inline:{a=1} inline:{b=2}}").lookup("c") is None


def test_pipemap_feeds_each_answer_to_the_next_table():
    t = open_table("pipemap:{inline:{a=b}, inline:{b=c}}")
    assert t.lookup("a") == "c"
    assert t.lookup("b") is None


def test_composite_table_errors():
    for spec in ("unionmap:inline:{a=b}", "unionmap:{}", "pipemap:{bogus}"):
        with pytest.raises(TableError):
            open_table(spec)


def test_composite_reload_forwards_to_children(tmp_path):
    path = tmp_path / "t.cidr"
    write(path, "10.0.0.0/8 old\n", mtime=1_600_000_000)
    t = open_table(f"unionmap:{{cidr:{path}, static:x}}")
    write(path, "10.0.0.0/8 new\n", mtime=1_600_000_100)
    assert t.reload_if_changed() is True
    assert t.lookup("10.1.1.1") == "new,x"


# ================================================================ compile_table / query_table


def test_query_table_answers_like_postmap_q(tmp_path):
    path = write(tmp_path / "virtual", "info@example.com alice\n")
    assert query_table(f"hash:{path}", "info@example.com") == "alice"
    assert query_table(f"hash:{path}", "other@example.com") is None
    assert query_table("inline:{a=b}", "A") == "b"
    assert query_table(f"hash:{write(tmp_path / 'aliases', 'root: admin' + chr(10))}", "root", fmt="alias") == "admin"
    cidr = write(tmp_path / "c.cidr", "10.0.0.0/8 ten\n")
    assert query_table(f"cidr:{cidr}", "10.9.9.9") == "ten"


def test_query_table_with_a_missing_file_is_an_error(tmp_path):
    for kind in ("hash", "texthash", "regexp", "pcre", "cidr"):
        with pytest.raises(TableError) as info:
            query_table(f"{kind}:{tmp_path / 'absent'}", "k")
        assert "does not exist" in str(info.value)


def test_compile_table_checks_pattern_tables_and_returns_their_path(tmp_path):
    path = write(tmp_path / "t.pcre", "/a/ b\n")
    assert compile_table(f"pcre:{path}") == path
    bad = write(tmp_path / "b.pcre", "/a/ b\n/(/ c\n")
    with pytest.raises(TableError) as info:
        compile_table(f"pcre:{bad}")
    assert f"{bad}:2" in str(info.value)
    with pytest.raises(TableError):
        compile_table("inline:{a=b}")


def test_a_locked_sqlite_database_is_a_quick_temporary_lookup_error(tmp_path, sqlite_db):
    """Lookups run on the event loop: a database locked by another program
    fails the lookup (temporary) after a short wait, not sqlite's 5 s."""
    import time

    cf = sqlite_cf(tmp_path, sqlite_db, "SELECT forw FROM aliases WHERE alias='%s'")
    t = open_table(f"sqlite:{cf}")
    writer = sqlite3.connect(sqlite_db, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(TableLookupError, match="locked"):
            t.lookup("info@example.com")
        assert time.monotonic() - started < 1.0
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert t.lookup("info@example.com") == "alice@example.com"
    t.close()


def test_a_rewrite_within_the_same_time_stamp_is_still_reread(tmp_path):
    """The signature is time stamp, size and inode: a file rewritten within
    one clock tick (same mtime) with other contents is re-read."""
    from mailserver.tables import open_tables

    path = tmp_path / "map"
    path.write_text("a@x.test 1\n")
    os.utime(path, (1_000_000, 1_000_000))
    tables = open_tables([f"texthash:{path}"])
    path.write_text("a@x.test 1234\n")
    os.utime(path, (1_000_000, 1_000_000))
    tables.reload_if_changed()
    assert tables.lookup("a@x.test") == "1234"



def test_a_sqlite_table_keeps_its_query_when_its_cf_file_disappears_each_time(tmp_path, sqlite_db):
    """The vanished-file rule for sqlite:, twice: the .cf file's return is
    read, and a second disappearance is reported (and kept) like the first."""
    warnings = []
    query = "SELECT forw FROM aliases WHERE alias='%s' AND active = 1"
    cf = sqlite_cf(tmp_path, sqlite_db, query)
    t = open_table(f"sqlite:{cf}", warn=warnings.append)
    try:
        for round_ in (1, 2):
            os.unlink(cf)
            assert t.reload_if_changed() is False
            assert t.lookup("info@example.com") == "alice@example.com"
            assert len(warnings) == round_ and "disappeared; keeping the previous version" in warnings[-1]
            write(tmp_path / "map.cf", f"dbpath = {sqlite_db}\nquery = {query}\n", mtime=1_600_000_000 + round_)
            assert t.reload_if_changed() is True
            assert t.lookup("info@example.com") == "alice@example.com"
    finally:
        t.close()


def test_a_hash_table_read_into_memory_keeps_its_contents_when_its_source_disappears(tmp_path):
    """hash: beside an index that is not ours (a Berkeley DB left by
    Postfix) is read from its source into memory; when that source goes,
    the table keeps what it had, not an empty table."""
    warnings = []
    path = write(tmp_path / "access", "blocked.example REJECT\n", mtime=1_600_000_000)
    (tmp_path / "access.db").write_bytes(b"\x00\x06\x15\x61 not an index of ours " * 8)
    t = open_table(f"hash:{path}", warn=warnings.append)
    try:
        assert isinstance(t, HashTable) and t.in_memory
        os.unlink(path)
        assert t.reload_if_changed() is False
        assert t.lookup("blocked.example") == "REJECT"
        assert any("disappeared; keeping the previous version" in w and path in w for w in warnings)
    finally:
        t.close()


def test_getpwnam_tells_a_lookup_that_could_not_run_from_a_miss(monkeypatch):
    """getpwnam_r's own answers (a source that is down cannot be had here:
    the C function is replaced by one that answers as such a source does):
    an error is an OSError, ERANGE a larger buffer, ENOENT a miss."""
    import errno

    from mailserver import tables

    calls = []

    def answering(*codes):
        def getpwnam_r(name, entry, buf, size, result):
            calls.append(size)
            return codes[min(len(calls), len(codes)) - 1]
        return getpwnam_r

    monkeypatch.setattr(tables, "_GETPWNAM_R", [answering(errno.EIO)])
    with pytest.raises(OSError) as info:
        tables.getpwnam("someone")
    assert info.value.errno == errno.EIO and "cannot look up user 'someone'" in str(info.value)
    calls.clear()
    monkeypatch.setattr(tables, "_GETPWNAM_R", [answering(errno.ERANGE, errno.ERANGE, 0)])
    assert tables.getpwnam("someone") is None and calls == [1024, 4096, 16384]
    monkeypatch.setattr(tables, "_GETPWNAM_R", [answering(errno.ENOENT)])
    assert tables.getpwnam("someone") is None
