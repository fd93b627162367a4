"""The Jinja environment task templates run in: sandboxed, strict, text only, on a budget.

Three guarantees, each checked at render time (and statically where the template alone shows it,
in `schema.py`):

- No escape. `ImmutableSandboxedEnvironment` without a loader: no Python internals (`__class__`,
  `__globals__`), no mutation of the row, no other files, no network.
- Text only. A template cannot put a Python object's repr into a record: a method it forgot to call
  (`{{ text.upper }}`), a function, a class, a generator (`{{ x | map('upper') }}` without `| list`),
  a loop or namespace object, anything printed as `<... at 0x...>`. `{{ }}` outputs, `~`, `%`,
  `str.format` and the filters that turn a value into text refuse such values (`ObjectOutputError`);
  plain data (text, numbers, booleans, None, dates, lists and mappings of those) passes.
- A budget (`render_part`). Every part of a record renders in at most `MAX_RENDER_SECONDS` seconds
  to at most `MAX_PART_CHARS` characters. Time is checked at every loop iteration, call, attribute
  and item access, filter and output chunk; size on the output stream and, *before* a big string is
  built, on every operation that can grow text fast: `*` repetition, `**`, `center`/`ljust`/
  `rjust`/`zfill`/`indent` widths, `%` and `format` widths, `replace`, `join`, `batch`/`slice`,
  `tojson` indents, namespace attributes and macro arguments (`BudgetError`).

Each error is raised inside Jinja; `Task.render` turns it into a `TemplateError` at the variant
part's `file:line` (a row that trips it is a bad row in `sources.load_rows`).
"""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import inspect
import re
import string
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Cycler, Joiner, Namespace

from t2t_mtl.tasks.parsing import ner_linearize

__all__ = [
    "MAX_PART_CHARS",
    "MAX_RENDER_SECONDS",
    "BudgetError",
    "ObjectOutputError",
    "make_env",
    "object_problem",
    "prepare",
    "render_part",
]

MAX_PART_CHARS = 1_000_000  # characters one part (instruction, input or output) may render to
MAX_RENDER_SECONDS = 2.0  # wall time one part may take (a normal part takes microseconds)
_ITER_FILTER = "t2t_budget_iter"  # wraps every {% for %} iterable (see `prepare`)
_TEXT_FILTER = "t2t_text"  # wraps every operand of `~` (see `prepare`)


class BudgetError(Exception):
    """A template went over its render budget (time or output size; `timed_out` for time)."""

    def __init__(self, message: str, *, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


class ObjectOutputError(Exception):
    """A template tried to put a Python object (not plain data) into the text."""


# ------------------------------------------------------------------ budget state

_state = threading.local()  # .deadline: time.monotonic() limit of the part being rendered


def _tick() -> None:
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise BudgetError(f"rendering took over {MAX_RENDER_SECONDS:g} s", timed_out=True)


def _size_check(n: int, what: str) -> None:
    if n > MAX_PART_CHARS:
        raise BudgetError(f"{what} would be {n:,} characters, over {MAX_PART_CHARS:,}")


def render_part(template: jinja2.Template, ctx: dict) -> str:
    """Render one compiled part within the budget: at most `MAX_RENDER_SECONDS` and
    `MAX_PART_CHARS` characters (raises BudgetError), text only (ObjectOutputError)."""
    outer = getattr(_state, "deadline", None)
    _state.deadline = time.monotonic() + MAX_RENDER_SECONDS
    try:
        chunks, size = [], 0
        for chunk in template.generate(ctx):  # time is checked inside: loops, calls, filters
            size += len(chunk)
            if size > MAX_PART_CHARS:
                raise BudgetError(f"the output is over {MAX_PART_CHARS:,} characters")
            chunks.append(chunk)
        out = "".join(chunks)
    finally:
        _state.deadline = outer
    if "<" in out:
        _check_no_repr(out, ctx)
    return out


# ------------------------------------------------------------------ plain data

_SCALARS = (str, int, float, bool, type(None), decimal.Decimal, dt.date, dt.time, dt.timedelta)
_ITERATORS = (
    types.GeneratorType,
    map,
    filter,
    zip,
    enumerate,
    reversed,
    range,
    type({}.keys()),
    type({}.values()),
    type({}.items()),
    Iterator,
)


def _describe(v: Any) -> str:
    """What a non-data value is, in words a template writer recognises, with how to fix it."""
    name = getattr(v, "__name__", type(v).__name__)
    if isinstance(v, LoopContext):
        return "the loop object: use loop.index, loop.first, ... instead"
    if isinstance(v, Namespace):
        return "a namespace object: output one of its attributes"
    if isinstance(v, (Cycler, Joiner)):
        return f"a {type(v).__name__.lower()} object: call it (or its next())"
    if isinstance(v, Macro):
        return f"the macro '{name}': call it, {name}(...)"
    if isinstance(v, type):
        return f"the class '{name}'"
    if isinstance(v, types.ModuleType):
        return f"the module '{name}'"
    if inspect.ismethod(v) or inspect.isbuiltin(v) or inspect.ismethoddescriptor(v):
        return f"the method '{name}' (a method not called): call it, e.g. .{name}()"
    if callable(v):
        return f"the function '{name}' (not called): call it, {name}(...)"
    if isinstance(v, (types.GeneratorType, map, filter, zip, enumerate, reversed, Iterator)):
        return "a generator (from map/select/...): add | list or | join"
    if isinstance(v, (type({}.keys()), type({}.values()), type({}.items()))):
        return "a dict view (keys/values/items): add | list"
    return f"a Python object ({type(v).__name__}), not data"


def object_problem(v: Any, *, iterables: bool = False, _depth: int = 0) -> str | None:
    """Why `v` cannot become text (`_describe`), or None for plain data: text, numbers, booleans,
    None, dates, and lists, tuples, sets and mappings of those. `iterables`: generators and dict
    views pass too (their items are checked where they become text)."""
    if isinstance(v, _SCALARS) or isinstance(v, jinja2.Undefined):
        return None
    if _depth > 50:  # deeper data is data; a cycle cannot be built in the immutable sandbox
        return None
    if isinstance(v, (list, tuple, set, frozenset)):
        for x in v:
            why = object_problem(x, _depth=_depth + 1)
            if why:
                return why
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            why = object_problem(k, _depth=_depth + 1) or object_problem(x, _depth=_depth + 1)
            if why:
                return why
        return None
    if iterables and isinstance(v, _ITERATORS):
        return None
    if isinstance(v, range):
        return None
    return _describe(v)


def _plain(v: Any, where: str, *, iterables: bool = False) -> Any:
    why = object_problem(v, iterables=iterables)
    if why:
        raise ObjectOutputError(f"{where} cannot put {why}")
    return v


def _finalize(v: Any) -> Any:
    """Every `{{ ... }}` value passes here before it becomes text. None (a missing optional field,
    a null inside a row's dict) is empty text, never the word "None"."""
    if v is None:
        return ""
    return _plain(v, "{{ }}")


# A Python object's repr that slipped through every check above (defence in depth): refused when
# the row's own text does not contain it.
_REPR = re.compile(
    r"<(?:built-in (?:method|function)|bound method|function|class|module|method-wrapper|"
    r"slot wrapper|generator object|coroutine object|[A-Za-z_][\w.]* object)[^<>\n]{0,200}>"
    r"|<[^<>\n]{1,200} at 0x[0-9a-fA-F]{4,}>"
)


def _row_texts(v: Any, depth: int = 0) -> Iterator[str]:
    if isinstance(v, str):
        yield v
    elif depth < 20 and isinstance(v, dict):
        for x in v.values():
            yield from _row_texts(x, depth + 1)
    elif depth < 20 and isinstance(v, (list, tuple)):
        for x in v:
            yield from _row_texts(x, depth + 1)


def _check_no_repr(out: str, ctx: dict) -> None:
    m = _REPR.search(out)
    if m is None:
        return
    if any(m.group(0) in t for t in _row_texts(ctx)):
        return  # the row's own text says it
    raise ObjectOutputError(f"the text would hold a Python object's repr {m.group(0)[:80]!r}")


# ------------------------------------------------------------------ growth checks

_PERCENT_SPEC = re.compile(
    r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]"
)
_DIGITS = re.compile(r"\d+")


def _ints(values: Any) -> list[int]:
    if isinstance(values, dict):
        values = list(values.values())
    elif not isinstance(values, (list, tuple)):
        values = [values]
    return [x for x in values if isinstance(x, int) and not isinstance(x, bool)]


def _check_percent(fmt: str, args: Any) -> None:
    """`fmt % args`: widths and precisions, written or given by `*`, stay within the budget."""
    star = False
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            if g == "*":
                star = True
            elif g is not None:
                _size_check(int(g), "a % format width")
    if star:
        for n in _ints(args):
            _size_check(abs(n), "a % format width")
    _plain(args, "%")


def _check_format(fmt: str, args: tuple, kwargs: dict) -> None:
    """`fmt.format(...)`: widths written in the spec or taken from arguments stay within budget."""
    nested = False
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # str.format reports the bad format itself
    for _, field_name, spec, _ in parsed:
        if field_name is None or not spec:
            continue
        nested = nested or "{" in spec
        for d in _DIGITS.findall(spec):
            _size_check(int(d), "a format width")
    if nested:
        for n in _ints(list(args) + list(kwargs.values())):
            _size_check(abs(n), "a format width")
    for a in list(args) + list(kwargs.values()):
        _plain(a, "format()")


def _check_replace(s: str, old: Any, new: Any, count: Any = -1) -> None:
    if not (isinstance(old, str) and isinstance(new, str)) or len(new) <= len(old):
        return
    n = (len(s) + 1 if old == "" else s.count(old)) if count in (-1, None) else count
    if isinstance(n, int):
        _size_check(len(s) + n * (len(new) - len(old)), "replace()")


def _check_join(sep: Any, items: Any) -> None:
    if isinstance(items, (list, tuple)):
        for x in items:
            _plain(x, "join")
        total = sum(len(x) if isinstance(x, str) else 8 for x in items)
        _size_check(total + len(str(sep)) * max(len(items) - 1, 0), "join()")


def _check_str_call(s: str, name: str, args: tuple, kwargs: dict) -> None:
    """Before a `str` method runs: what it would build stays within the budget."""
    if name in ("center", "ljust", "rjust", "zfill") and args:
        if isinstance(args[0], int):
            _size_check(args[0], f"str.{name}() width")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            _size_check(len(s) * max(size, 1), "str.expandtabs()")
    elif name == "replace" and len(args) >= 2:
        _check_replace(s, *args[:3])
    elif name == "join" and args:
        _check_join(s, args[0])
    elif name in ("format", "format_map"):
        if name == "format_map" and args and isinstance(args[0], dict):
            _check_format(s, (), args[0])
        else:
            _check_format(s, args, kwargs)


def _size_of(v: Any) -> int:
    return len(v) if isinstance(v, (str, list, tuple, dict)) else 0


# ------------------------------------------------------------------ the environment


class _Env(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus the text-only rule and the render budget (module docstring)."""

    intercepted_binops = frozenset(["*", "**", "%", "+"])

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise SecurityError("exponent too large in a template")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if (
                    isinstance(seq, (str, list, tuple))
                    and isinstance(n, int)
                    and len(seq) * n > 100_000
                ):
                    raise SecurityError("repetition too large in a template")
        elif operator == "%" and isinstance(left, str):
            _check_percent(left, right)
        elif operator == "+" and isinstance(left, (str, list, tuple)):
            _size_check(_size_of(left) + _size_of(right), "a + result")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's own signature
        _tick()
        if isinstance(__obj, Macro):
            for a in list(args) + list(kwargs.values()):
                _size_check(_size_of(a), "a macro argument")
        else:
            owner = getattr(__obj, "__self__", None)
            name = getattr(__obj, "__name__", "")
            if isinstance(owner, str):
                _check_str_call(owner, name, args, kwargs)
            elif name in ("format", "format_map") and isinstance(
                getattr(__obj, "__wrapped__", None), Callable
            ):
                fmt = getattr(__obj.__wrapped__, "__self__", None)  # the sandbox's str.format
                if isinstance(fmt, str):
                    _check_str_call(fmt, name, args, kwargs)
            for a in list(args) + list(kwargs.values()):
                _plain(a, f"{name or 'a call'}()", iterables=True)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


# Filters that turn their value into text: a Python object must not reach them.
_TEXT_FILTERS = {
    "capitalize",
    "center",
    "e",
    "escape",
    "filesizeformat",
    "forceescape",
    "format",
    "indent",
    "lower",
    "pprint",
    "replace",
    "safe",
    "string",
    "striptags",
    "title",
    "trim",
    "truncate",
    "upper",
    "urlencode",
    "urlize",
    "wordcount",
    "wordwrap",
    "xmlattr",
}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _filter_growth(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """Before a filter runs: the text or list it would build stays within the budget."""
    if name == "center":
        width = _arg(args, kwargs, 0, "width", 80)
        if isinstance(width, int):
            _size_check(width, "center width")
    elif name == "indent":
        width = _arg(args, kwargs, 0, "width", 4)
        width = len(width) if isinstance(width, str) else width
        if isinstance(width, int):
            _size_check(width, "indent width")
            lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
            _size_check(len(str(value)) + width * lines, "indent")
    elif name == "format" and isinstance(value, str):
        _check_percent(value, kwargs or args)
    elif name == "replace" and isinstance(value, str) and len(args) >= 2:
        _check_replace(value, *args[:3])
    elif name == "join":
        _check_join(_arg(args, kwargs, 0, "d", ""), value)
    elif name in ("batch", "slice"):
        n = _arg(args, kwargs, 0, "linecount" if name == "batch" else "slices")
        if isinstance(n, int):
            _size_check(n, f"{name} size")
    elif name == "tojson":
        indent = _arg(args, kwargs, 0, "indent")
        if isinstance(indent, int) and indent > 100:
            raise BudgetError("tojson indent over 100")


def _budget_filter(name: str, func: Callable) -> Callable:
    text = name in _TEXT_FILTERS

    @functools.wraps(func)  # keeps Jinja's pass_context / pass_environment marks
    def wrapper(*all_args: Any, **kwargs: Any) -> Any:
        _tick()
        # Jinja passes (context|eval_ctx|environment,) first for marked filters.
        skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        value, args = (all_args[skip], all_args[skip + 1 :]) if len(all_args) > skip else (None, ())
        if text:
            _plain(value, f"the '{name}' filter")
        _filter_growth(name, value, args, kwargs)
        for a in list(args) + list(kwargs.values()):
            _plain(a, f"the '{name}' filter", iterables=True)
        return func(*all_args, **kwargs)

    return wrapper


def _budget_iter(value: Any) -> Iterator[Any]:
    """Every `{% for %}` iterates through this: the time budget is checked at each item."""
    for x in value:
        _tick()
        yield x


def _text(value: Any) -> Any:
    """Every operand of `~` passes here: only plain data becomes text."""
    return _plain(value, "~")


class _BudgetNamespace(Namespace):
    """`namespace()` whose attributes cannot grow past the budget (`{% set ns.s = ns.s ~ ns.s %}`
    in a loop doubles a text each time)."""

    def __setitem__(self, name: str, value: Any) -> None:
        _tick()
        _size_check(_size_of(value), f"namespace attribute '{name}'")
        super().__setitem__(name, value)


def _budget_range(*args: int) -> Iterator[int]:
    """`range` with the sandbox's size limit, checking the time budget as it goes."""
    from jinja2.sandbox import safe_range

    return _budget_iter(safe_range(*args))


def _budget_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """`lipsum` (Jinja's own argument names) within the size budget: it builds its text in one
    call, out of reach of the time checks."""
    if isinstance(n, int) and isinstance(max, int):
        _size_check(n * max * 12, "lipsum()")  # at most ~12 characters a word
    return jinja2.utils.generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def make_env() -> jinja2.Environment:
    """The environment every variant is compiled with: sandboxed, strict, no loader, text only,
    on a budget (module docstring). Parts compiled from `prepare`d templates check loops too."""
    env = _Env(undefined=jinja2.StrictUndefined, autoescape=False, finalize=_finalize)
    env.filters["ner_linearize"] = ner_linearize  # {{ tokens | ner_linearize(ner_tags) }}
    env.globals["ner_linearize"] = ner_linearize  # {{ ner_linearize(tokens, ner_tags) }}
    env.globals["namespace"] = _BudgetNamespace
    env.globals["range"] = _budget_range
    env.globals["lipsum"] = _budget_lipsum
    env.filters = {name: _budget_filter(name, f) for name, f in env.filters.items()}
    env.filters[_ITER_FILTER] = _budget_iter
    env.filters[_TEXT_FILTER] = _text
    return env


def prepare(ast: nodes.Template) -> nodes.Template:
    """Rewrite a parsed (and statically checked) template before compiling: every `{% for %}`
    iterable passes through the budget, every `~` operand through the text-only check."""
    for node in ast.find_all(nodes.For):
        node.iter = nodes.Filter(node.iter, _ITER_FILTER, [], [], None, None, lineno=node.lineno)
    for node in ast.find_all(nodes.Concat):
        node.nodes = [
            nodes.Filter(n, _TEXT_FILTER, [], [], None, None, lineno=n.lineno) for n in node.nodes
        ]
    return ast
