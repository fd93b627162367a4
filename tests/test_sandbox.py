"""A template can never reach Python internals, files or the network.

Two layers are checked: the static check at load time (with file:line), and the sandbox at render
time for escapes the static check cannot see (names built at runtime, str.format, mutation).
"""

from __future__ import annotations

import textwrap

import pytest
from jinja2.sandbox import SecurityError

from t2t_mtl.cli.main import main
from t2t_mtl.core.errors import TemplateError
from t2t_mtl.tasks.task import ENV, load_task_file, read_task_file

STATIC_ESCAPES = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ self._TemplateReference__context }}",
    "{{ text | attr('__class__') }}",
    "{{ text['__class__'] }}",
    "{{ joiner.__init__.__globals__.__builtins__ }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% from 'x.j2' import y %}",
    "{% extends 'base.j2' %}",
]

# Names assembled at render time slip past any static check; the sandbox must refuse them.
RUNTIME_ESCAPES = [
    "{{ text[('__cla' ~ 'ss__')] }}",
    "{{ cycler | attr('__in' ~ 'it__') }}",
    "{{ namespace | attr('__in' ~ 'it__') }}",
    "{{ self[('_TemplateReference' ~ '__context')] }}",
    "{{ '{0.__class__}'.format(text) }}",
    "{{ '{x.__class__.__base__}'.format_map({'x': text}) }}",
    "{% set d = dict() %}{{ d.update({'a': 1}) }}",
    "{% set l = [1] %}{{ l.append(2) }}",
    "{{ 'x' * 10000000 }}",
    "{{ 2 ** 100000 }}",
]


def _write(tmp_path, expr: str, name: str = "escape"):
    f = tmp_path / f"{name}.yaml"
    f.write_text(
        textwrap.dedent(f"""\
        name: {name}
        task_type: generation
        version: 1
        fields: {{text: str, target: str}}
        variants:
          - id: v
            input: |
              Text:
              {expr}
            output: "{{{{ target }}}}"
        metric: [rouge]
        parse: text
        """),
        encoding="utf-8",
    )
    return f


@pytest.mark.parametrize("expr", STATIC_ESCAPES)
def test_static_escapes_refused_at_load_with_line(tmp_path, expr, capsys):
    f = _write(tmp_path, expr)
    tpl, problems = read_task_file(f)
    assert tpl is None
    assert problems and all(p.file == str(f) and p.line == 9 for p in problems), [
        p.format() for p in problems
    ]
    assert any("not allowed" in p.message for p in problems)
    rc = main(["validate", str(f), "--no-trial"])
    _, err = capsys.readouterr()
    assert rc == 2 and f"{f}:9: variant 'v' input:" in err and "Traceback" not in err


@pytest.mark.parametrize("expr", RUNTIME_ESCAPES)
def test_runtime_escapes_refused_by_sandbox(tmp_path, expr, capsys):
    f = _write(tmp_path, expr)
    tpl = load_task_file(f)  # nothing visible statically
    with pytest.raises(TemplateError) as ei:
        tpl.render({"text": "hello", "target": "x"}, "v", row_id="0", split="train")
    (p,) = ei.value.problems
    assert p.file == str(f) and p.line == 9, p.format()
    assert p.message.startswith("variant 'v' input: ")
    assert "not allowed in a template" in p.message or "unsafe" in p.message, p.message
    # The same through the CLI: file:line on stderr, exit 2, no traceback.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(
        '{"text": "hello", "target": "x"}\n', encoding="utf-8"
    )
    rc = main(["preview", str(f), "--source", str(tmp_path / "data")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert f"{f}:9: variant 'v' input: " in err and "Traceback" not in err


def test_environment_has_no_loader_and_blocks_internals():
    assert (
        ENV.loader is None
    )  # {% include %} could never read a file even if the static check missed it
    with pytest.raises(TypeError, match="no loader"):
        ENV.from_string("{% include 'x' %}").render()
    with pytest.raises(SecurityError):
        ENV.from_string("{{ x.__class__ }}").render(x=1)
    with pytest.raises(OverflowError):
        ENV.from_string("{{ range(10**7) | list | length }}").render()


def test_plain_templates_still_work(tmp_path):
    f = _write(
        tmp_path,
        "{{ text | upper }} {{ '%s!' % text }} {{ range(3) | list | join(',') }} {{ 'ab' * 3 }}",
    )
    rec = load_task_file(f).render({"text": "hi", "target": "ok"}, row_id="0", split="train")
    assert rec.input == "Text:\nHI hi! 0,1,2 ababab"
    assert rec.output == "ok"
