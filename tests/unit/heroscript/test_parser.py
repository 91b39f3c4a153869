"""One test (at least) per rule of the language (docs/heroscript.md); errors assert line and column."""

from __future__ import annotations

import textwrap

import pytest

from herovm.heroscript import HeroScriptError, parse


def p(text: str, **kw):
    return parse(textwrap.dedent(text), **kw)


def err(text: str, **kw) -> HeroScriptError:
    with pytest.raises(HeroScriptError) as info:
        parse(text, **kw)
    return info.value


def one(text: str):
    pb = p(text)
    assert len(pb) == 1, pb.actions
    return pb.actions[0]


# --- Text and blocks ----------------------------------------------------------------------------------


def test_markdown_prose_shebang_headings_and_fences_are_ignored():
    pb = parse(
        "#!/usr/bin/env herovm\n# Title\nSome prose.\n```hero\n!!vm.create name:a\n```\n"
        "more text\n!!vm.start\n"
    )
    assert [(a.actor, a.name, a.line) for a in pb] == [("vm", "create", 5), ("vm", "start", 8)]
    assert pb.shebang == "#!/usr/bin/env herovm"


def test_markdown_image_is_not_an_action():
    pb = parse("![logo](x.png)\n!!a.b\n")
    assert [a.fullname for a in pb] == ["a.b"]


def test_whole_text_is_dedented_and_positions_refer_to_original():
    pb = parse("    !!vm.create name:a\n      memory:1GB\n")
    a = pb[0]
    assert (a.line, a.col) == (1, 5)
    assert a.params.to_dict() == {"name": "a", "memory": "1GB"}
    assert a.params.position("memory") == (2, 7)


def test_tab_in_indentation_counts_as_four_spaces_and_tabs_in_values_are_kept():
    a = parse("!!a.b x:1\n\tcontent:'a\tb'\n")[0]
    assert a.params["content"] == "a\tb"
    assert a.params.position("content") == (2, 2)


def test_kinds_by_number_of_bangs():
    pb = parse("!a.d\n!!a.s\n!!!a.m\n!!!!a.w\n")
    assert [a.kind for a in pb] == ["dal", "sal", "macro", "wal"]


def test_five_bangs_is_an_error():
    e = err("\n  !!!!!a.b\n")
    assert (e.line, e.col) == (2, 3)
    assert "1 to 4" in e.message


def test_name_without_actor_is_core():
    a = parse("!!install x:1\n")[0]
    assert (a.actor, a.name, a.fullname) == ("core", "install", "core.install")


def test_name_normalisation():
    a = parse("!!VM.Create-Big\n")[0]
    assert (a.actor, a.name) == ("vm", "create_big")
    a = parse("!!My;Actor.do:it+now\n")[0]
    assert (a.actor, a.name) == ("my_actor", "do_itnow")


def test_three_dotted_parts_is_an_error():
    e = err("!!a.b.c x:1\n")
    assert (e.line, e.col) == (1, 3)
    assert "3 dotted parts" in e.message


def test_missing_or_empty_name_is_an_error():
    assert (err("!! x:1\n").line, err("!! x:1\n").col) == (1, 3)
    e = err("text\n!!.b\n")
    assert (e.line, e.col) == (2, 3)


def test_rest_of_action_line_is_first_parameter_line():
    a = parse("!!vm.create name:a memory:1GB\n")[0]
    assert a.params.to_dict() == {"name": "a", "memory": "1GB"}


def test_continuation_lines_and_blank_lines_inside_block():
    a = p(
        """\
        !!vm.create name:a

          memory:1GB

            cpus:2
        !!vm.start
        """
    )[0]
    assert a.params.to_dict() == {"name": "a", "memory": "1GB", "cpus": "2"}


def test_block_ends_at_less_indented_line_or_bang():
    pb = p(
        """\
        !!a.one x:1
          y:2
        prose ends the block
          z:3
        !!a.two
          !!a.three
        """
    )
    assert [a.fullname for a in pb] == ["a.one", "a.two", "a.three"]
    assert pb[0].params.to_dict() == {"x": "1", "y": "2"}
    assert pb[1].params.to_dict() == {}


def test_herovm_one_space_indent_inside_block_is_an_error():
    e = err("!!a.b x:1\n  y:2\n\n z:3\n")
    assert (e.line, e.col) == (4, 2)
    assert "1 space" in e.message
    assert e.hint


def test_herovm_unindented_parameter_line_directly_under_action_is_an_error():
    e = err("!!a.b x:1\nmemory:1GB\n")
    assert (e.line, e.col) == (2, 1)
    assert e.message == "parameter lines must be indented by 2 spaces"
    assert str(e).startswith("<string>:2:1: parameter lines must be indented by 2 spaces\n  hint: ")


def test_unindented_parameter_like_line_after_blank_line_is_ignored_text():
    pb = parse("!!a.b x:1\n\nNote: this is prose\n")
    assert pb[0].params.to_dict() == {"x": "1"}


# --- Comments --------------------------------------------------------------------------------------


def test_comments_above_action_with_blank_lines_between():
    a = one(
        """\
        // first
        //second

        // third
        !!a.b
        """
    )
    assert a.comments == ["first", "second", "third"]


def test_comments_separated_by_text_do_not_attach():
    pb = parse("// lost\nprose\n!!a.b\n")
    assert pb[0].comments == []
    assert pb.dropped


def test_html_comments_are_comments():
    pb = parse("<!--\n!!not.an_action\n-->\n!!a.b x:1 <!-- note --> y:2\n  <!-- multi\n  line --> z:3\n")
    assert [a.fullname for a in pb] == ["a.b"]
    assert pb[0].params.to_dict() == {"x": "1", "y": "2", "z": "3"}


def test_unclosed_html_comment_is_an_error():
    e = err("!!a.b\n\n<!-- never\nclosed\n")
    assert (e.line, e.col) == (3, 1)


def test_hash_is_an_error_inside_a_block():
    e = err("!!a.b x:1\n  # not a comment\n")
    assert (e.line, e.col) == (2, 3)
    assert "use //" in e.hint
    e = err("!!a.b x:1 #c\n")
    assert (e.line, e.col) == (1, 11)


def test_hash_outside_blocks_is_ignored_text_and_hash_in_value_is_kept():
    pb = parse("# heading\n!!a.b color:#fff\n")
    assert pb[0].params["color"] == "#fff"


def test_comment_inside_block_attaches_to_next_parameter():
    a = one(
        """\
        !!a.b x:1 // about y
          // more about y
          y:2
          z:3
        """
    )
    assert a.params.comment("y") == "about y\nmore about y"
    assert a.params.comment("x") is None
    assert a.params.comment("z") is None


def test_herovm_double_slash_inside_value_is_not_a_comment():
    a = parse("!!a.b url:https://example.org/x path:a//b\n")[0]
    assert a.params.to_dict() == {"url": "https://example.org/x", "path": "a//b"}


def test_herovm_double_slash_inside_quotes_is_not_a_comment():
    a = parse("!!a.b cmd:'echo a // b'\n")[0]
    assert a.params["cmd"] == "echo a // b"


def test_herovm_quote_in_comment_does_not_swallow_the_block():
    a = one(
        """\
        !!a.b
          // don't
          x:1
          y:2
        """
    )
    assert a.params.to_dict() == {"x": "1", "y": "2"}
    assert a.params.comment("x") == "don't"


# --- Parameters and arguments -------------------------------------------------------------------------


def test_key_value_with_spaces_after_colon_and_lowercased_keys():
    a = parse("!!a.b Name:  x  Disk.Size:1 a,b/c:2\n")[0]
    assert a.params.to_dict() == {"name": "x", "disk.size": "1", "a,b/c": "2"}


def test_invalid_key_character_is_an_error_with_position():
    e = err("!!vm.create name:a\n  disk-size:10GB\n")
    assert (e.line, e.col) == (2, 7)
    assert "'-'" in e.message and "disk-size" in e.message
    assert "disk_size" in e.hint


def test_empty_key_is_an_error():
    e = err("!!a.b :x\n")
    assert (e.line, e.col) == (1, 7)


def test_unquoted_value_runs_to_white_space():
    a = parse("!!a.b x:a'b\"c y:z\n")[0]
    assert a.params.to_dict() == {"x": "a'b\"c", "y": "z"}


def test_bracket_value_runs_to_matching_bracket():
    a = parse("!!a.b dns:['8.8.8.8', '8.8.4.4'] l:[a,b] n:[[1, 2], ']'] z:1\n")[0]
    assert a.params["dns"] == "['8.8.8.8', '8.8.4.4']"
    assert a.params.get_list("dns") == ["8.8.8.8", "8.8.4.4"]
    assert a.params.get_list("l") == ["a", "b"]
    assert a.params["n"] == "[[1, 2], ']']"
    assert a.params["z"] == "1"


def test_unclosed_bracket_is_an_error():
    e = err("!!a.b x:1 dns:[a, b\n")
    assert (e.line, e.col) == (1, 15)


def test_bracket_value_may_span_lines():
    a = parse("!!a.b dns:[a,\n    b]\n")[0]
    assert a.params.get_list("dns") == ["a", "b"]


def test_quoted_values_both_kinds_trimmed_and_br():
    a = parse("!!a.b x:'  hello world ' y:\"a b\" z:'one<BR>two' w:a<BR>b\n")[0]
    assert a.params.to_dict() == {"x": "hello world", "y": "a b", "z": "one\ntwo", "w": "a\nb"}


def test_empty_values():
    a = parse("!!a.b x:'' y:\"\" z:\n  w:\n")[0]
    assert a.params.to_dict() == {"x": "", "y": "", "z": "", "w": ""}


def test_escaped_quotes_and_plain_backslashes():
    a = parse(r"!!a.b x:'it\'s' y:" + '"say \\"hi\\""' + r" z:'C:\dir\n'" + "\n")[0]
    assert a.params["x"] == "it's"
    assert a.params["y"] == 'say "hi"'
    assert a.params["z"] == "C:\\dir\\n"


def test_herovm_other_quote_kind_inside_value():
    a = parse('!!cmd.run cmd:\'echo "hi"\' b:"it\'s"\n')[0]
    assert a.params["cmd"] == 'echo "hi"'
    assert a.params["b"] == "it's"


def test_quote_not_closed_on_line_runs_on_with_newline_as_space():
    a = one(
        """\
        !!a.b desc:'hello
            big
          world' x:1
        """
    )
    assert a.params.to_dict() == {"desc": "hello big world", "x": "1"}


def test_unclosed_quote_is_an_error_at_the_quote():
    e = err("!!a.b x:1 desc:'hello\n  world\n!!c.d\n")
    assert (e.line, e.col) == (1, 16)


def test_text_right_after_closing_quote_is_an_error():
    e = err("!!a.b x:'a'b\n")
    assert (e.line, e.col) == (1, 12)


def test_unquoted_value_ending_in_comma_followed_by_more_is_an_error():
    e = err("!!a.b names:git, curl\n")
    assert (e.line, e.col) == (1, 18)
    assert "names:'git, curl'" in e.hint
    assert parse("!!a.b names:git,\n")[0].params["names"] == "git,"


def test_repeated_key_last_wins_keeps_first_place():
    a = parse("!!a.b x:1 y:2 x:3\n")[0]
    assert a.params.items() == [("x", "3"), ("y", "2")]
    assert a.params.repeated == [("x", 1, 7)]


def test_id_is_an_ordinary_parameter():
    assert parse("!!a.b id:7\n")[0].params["id"] == "7"


def test_arguments_in_order_with_case_kept():
    a = parse("!!pkg.install git Curl\n  vim-Nox x:1 'two words'\n")[0]
    assert a.args == ["git", "Curl", "vim-Nox", "two words"]
    assert a.params.to_dict() == {"x": "1"}
    assert a.arg_positions[2] == (2, 3)


def test_list_reader():
    a = parse("!!a.b names:'git, curl,, vim ' one:x\n")[0]
    assert a.params.get_list("names") == ["git", "curl", "vim"]
    assert a.params.get_list("one") == ["x"]


# --- Multi-line values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("delim", ["'", '"', "'''", '"""'])
def test_multiline_value_with_each_delimiter(delim):
    text = f"!!file.write path:/x content:{delim}\n    line one\n      indented\n    {delim}\n  mode:0644\n"
    a = parse(text)[0]
    assert a.params["content"] == "line one\n  indented"
    assert a.params["mode"] == "0644"


def test_multiline_content_is_verbatim():
    text = (
        "!!file.write content:'\n"
        "    !!not.an_action\n"
        "    # not an error\n"
        "    // not a comment\n"
        "    <!-- kept -->\n"
        "\n"
        '    it\'s "quoted"\ttab <BR>\n'
        "unindented\n"
        "    '\n"
    )
    a = parse(text)[0]
    assert a.params["content"] == (
        "    !!not.an_action\n    # not an error\n    // not a comment\n    <!-- kept -->\n\n"
        '    it\'s "quoted"\ttab <BR>\nunindented'
    )


def test_multiline_keeps_blank_lines_and_quotes():
    a = parse("!!a.b c:'\n  one\n\n  'two'\n  '\n")[0]
    assert a.params["c"] == "one\n\n'two'"


def test_multiline_closing_quote_other_kind_is_content():
    a = parse("!!a.b c:'''\n  '\n  \"\n  '''\n")[0]
    assert a.params["c"] == "'\n\""


def test_unclosed_multiline_is_an_error_naming_where_it_opened():
    e = err("!!a.b x:1\n  content:'\n    hello\n")
    assert (e.line, e.col) == (2, 11)
    assert "content" in e.message


# --- Variables and includes ------------------------------------------------------------------------------


def test_variables_replaced_for_given_names_only():
    a = parse("!!a.b n:${NAME} m:{NAME} cmd:'echo ${HOME} {OTHER}'\n", variables={"NAME": "web"})[0]
    assert a.params.to_dict() == {"n": "web", "m": "web", "cmd": "echo ${HOME} {OTHER}"}


def test_variables_with_newline_keep_line_numbers():
    pb = parse("!!a.b c:'\n  ${BODY}\n  '\n!!c.d\n", variables={"BODY": "x\n  y"})
    assert pb[0].params["c"] == "x\n  y"  # the value as given: it is not script text
    assert pb[1].line == 4


HOSTILE = "a'\n!!vm.copy src:box:/etc/shadow dst:./loot"


@pytest.mark.parametrize(
    "text",
    [
        "!!cmd.run cmd:'echo ${X}'\n",
        '!!cmd.run cmd:"echo {X}"\n',
        "!!cmd.run cmd:${X}\n",
        "!!cmd.run\n  cmd:'\n    echo ${X}\n    '\n",
        "!!cmd.run ${X} cmd:[${X}]\n",
    ],
)
def test_variables_are_values_never_script_text(text):
    """A value with a quote and a newline stays inside the value it was substituted into."""
    pb = parse(text, variables={"X": HOSTILE})
    plain = parse(text)
    assert [a.fullname for a in pb] == ["cmd.run"]
    assert pb[0].params.keys() == plain[0].params.keys() and len(pb[0].args) == len(plain[0].args)
    assert HOSTILE in pb[0].params["cmd"]
    assert pb[0].params.entry("cmd").raw == plain[0].params["cmd"]


def test_variable_with_white_space_and_colons_is_one_value():
    a = parse("!!a.b n:${X} m:1\n", variables={"X": "two words k:v // c"})[0]
    assert a.params.to_dict() == {"n": "two words k:v // c", "m": "1"} and a.args == []


def test_variables_are_substituted_once():
    a = parse("!!a.b n:'${X} ${Y}'\n", variables={"X": "${Y}", "Y": "<BR>{X}"})[0]
    assert a.params["n"] == "${Y} <BR>{X}"


def test_variable_in_an_include_path(tmp_path):
    (tmp_path / "inner.hero").write_text("!!b.c x:${V}\n")
    main = tmp_path / "main.hero"
    main.write_text("!!play.include path:'${F}'\n")
    from herovm.heroscript import load

    pb = load(main, variables={"F": "inner.hero", "V": "a'\n!!evil.x"})
    assert [a.fullname for a in pb] == ["b.c"] and pb[0].params["x"] == "a'\n!!evil.x"


def test_include_path_with_nul_is_an_error_at_its_position(tmp_path):
    f = tmp_path / "a.hero"
    f.write_text("\n!!play.include path:a\0b\n")
    from herovm.heroscript import load

    with pytest.raises(HeroScriptError) as info:
        load(f)
    assert (info.value.file, info.value.line, info.value.col) == (str(f), 2, 16)
    assert "NUL" in info.value.message
    with pytest.raises(HeroScriptError) as info:
        parse("!!play.include path:'${P}'\n", variables={"P": "x\0"})
    assert (info.value.line, info.value.col) == (1, 16)


def test_load_of_a_path_with_nul_is_a_heroscript_error():
    from herovm.heroscript import load

    with pytest.raises(HeroScriptError, match="cannot read"):
        load("a\0b.hero")


def test_include_relative_to_including_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.hero").write_text("!!b.one x:${V}\n\n!!b.two\n")
    main = tmp_path / "main.hero"
    main.write_text("!!a.first\n!!play.include path:'sub/inner.hero'\n!!a.last\n")
    from herovm.heroscript import load

    pb = load(main, variables={"V": "1"})
    assert [a.fullname for a in pb] == ["a.first", "b.one", "b.two", "a.last"]
    assert pb[1].file.endswith("inner.hero") and pb[1].line == 1 and pb[2].line == 3
    assert pb[1].params["x"] == "1"


def test_include_of_text_without_path_is_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "x.hero").write_text("!!b.c\n")
    monkeypatch.chdir(tmp_path)
    assert [a.fullname for a in parse("!!play.include path:x.hero\n")] == ["b.c"]


def test_include_cycle_is_an_error(tmp_path):
    (tmp_path / "a.hero").write_text("!!play.include path:b.hero\n")
    (tmp_path / "b.hero").write_text("\n!!play.include path:a.hero\n")
    from herovm.heroscript import load

    with pytest.raises(HeroScriptError) as info:
        load(tmp_path / "a.hero")
    assert info.value.file.endswith("b.hero")
    assert (info.value.line, info.value.col) == (2, 16)
    assert "cycle" in info.value.message


def test_include_missing_file_is_an_error(tmp_path):
    f = tmp_path / "a.hero"
    f.write_text("!!play.include path:nope.hero\n")
    from herovm.heroscript import load

    with pytest.raises(HeroScriptError) as info:
        load(f)
    assert (info.value.line, info.value.col) == (1, 16)


def test_includes_can_be_left_alone():
    pb = parse("!!play.include path:x.hero\n", resolve_includes=False)
    assert pb[0].fullname == "play.include"


# --- Positions and messages -------------------------------------------------------------------------------


def test_file_name_in_errors():
    e = err("!!a.b.c\n", path="plays/x.hero")
    assert str(e).startswith("plays/x.hero:1:3: ")
    assert e.file == "plays/x.hero"


def test_crlf_line_endings():
    a = parse("!!a.b x:1\r\n  y:'two words'\r\n")[0]
    assert a.params.to_dict() == {"x": "1", "y": "two words"}
