"""``gesr config list`` and ``gesr config show NAME [--set key=value ...]``: what presets and fields exist.

``list`` prints every preset with the first line of its docstring, and each ``NAME_two_tower`` variant.
``show`` prints every field of a config as ``section.field = value  # comment``; the comment is the one
written after the field in its dataclass (``gesr_jax/data/config.py``, ``gesr_jax/train/config.py``,
``gesr_jax/models/*/config.py``), read from the source with :mod:`ast` and :mod:`tokenize`, so the
documentation and the command cannot drift apart. A value that differs from the dataclass default is
marked ``*``. Nothing here imports JAX.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import inspect
import io
import json
import sys
import textwrap
import tokenize
from collections.abc import Iterator
from typing import Any

from gesr_jax import config as config_lib


def register(subparsers: Any) -> None:
    """Add ``config`` (with ``list`` and ``show``) to the main CLI's subparsers."""
    p = subparsers.add_parser("config", help="list presets, show a config's fields with their documentation")
    sub = p.add_subparsers(dest="config_command", required=True)
    q = sub.add_parser("list", help="every preset (and NAME_two_tower variant) with its one-line description")
    q.set_defaults(func=run_list)
    q = sub.add_parser("show", help="every field of a preset (after --set overrides) with its value and comment")
    q.add_argument("name", help="preset name (see `gesr config list`) or a .py file with get_config()")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field first, as for `gesr train` (repeatable)")  # fmt: skip
    q.add_argument("--json", action="store_true", help="print {key: {value, default, comment}} as JSON")
    q.set_defaults(func=run_show)


# ------------------------------------------------------------------------------------------- comments


@functools.cache
def _class_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` for the fields declared in ``cls`` itself (not its bases).

    A field's comment is the one at the end of its line(s); without one, the comment lines right above it
    (e.g. ``# 0 = every request ...`` over ``max_requests_per_user``).
    """
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a class defined in a notebook cell or a REPL has no source file
        return {}
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    tree = ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
        trailing = [comments[n] for n in lines if n in comments]
        if trailing:
            out[node.target.id] = " ".join(trailing)
            continue
        above, n = [], node.lineno - 1
        while n in comments and n not in code_lines:  # comment-only lines directly above the field
            above.insert(0, comments[n])
            n -= 1
        if above and not above[0].startswith("---"):  # a "# --- section ---" header is not a field's doc
            out[node.target.id] = " ".join(above)
    return out


def field_comment(cls: type, name: str) -> str:
    """The source comment of field ``name`` of dataclass ``cls``, looked up along its bases; "" if none."""
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            comment = _class_comments(klass).get(name)
            if comment:
                return comment
    return ""


@dataclasses.dataclass(frozen=True)
class FieldRow:
    key: str  # dotted path, e.g. "data.synthetic.num_users"
    value: Any
    default: Any  # the dataclass default (MISSING when the field has none)
    comment: str

    @property
    def changed(self) -> bool:
        return self.default is not dataclasses.MISSING and self.value != self.default


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def field_rows(config: Any, prefix: str = "") -> Iterator[FieldRow]:
    """Every leaf field of a (nested) config dataclass, depth first, in declaration order.

    A registered dataset's own section (``data.<source>``, see ``config.sections_and_fields``) follows the fields.
    """
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, value in config_lib.sections_and_fields(config):
        if dataclasses.is_dataclass(value):
            yield from field_rows(value, f"{prefix}{name}.")
        else:
            yield FieldRow(f"{prefix}{name}", value, _default(fields[name]), field_comment(type(config), name))


# ------------------------------------------------------------------------------------------- commands


def preset_descriptions() -> list[tuple[str, str]]:
    """``(name, first docstring line)`` of every preset, each followed by its two-tower variant when it has one."""
    out = []
    for name in config_lib.preset_names():
        module = importlib.import_module(f"gesr_jax.configs.{name}")  # presets are found by name at run time
        doc = inspect.getdoc(module) or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        out.append((name, first.removeprefix(f"{name}:").strip()))
        variant = name + config_lib.TWO_TOWER_SUFFIX
        try:
            config_lib.load_config(variant)
        except config_lib.ConfigError:
            continue  # no two-tower backbone to convert
        if getattr(module.get_config().model, "kind", "") != "two_tower":  # a two-tower preset is its own baseline
            out.append((variant, f"the two-tower baseline of {name} (same data, towers and training)"))
    return out


def run_list(args: argparse.Namespace) -> int:
    rows = preset_descriptions()
    width = max(len(n) for n, _ in rows)
    for name, text in rows:
        print(f"{name:<{width}}  {text}")
    print("\nshow one: gesr config show NAME [--set key=value ...]", file=sys.stderr)
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):  # as --set spells it: a,b,c and a:b,c:d
        return ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) or "()"
    return repr(value) if isinstance(value, str) else str(value)


def run_show(args: argparse.Namespace) -> int:
    config = config_lib.load_config(args.name, args.overrides)
    rows = list(field_rows(config))
    if args.json:
        data = {r.key: {"value": r.value, "default": None if r.default is dataclasses.MISSING else r.default,
                        "comment": r.comment} for r in rows}  # fmt: skip
        print(json.dumps(data, indent=1, default=str))
        return 0
    print(f"# {config.name}: model.kind={getattr(config.model, 'kind', '?')}; * = differs from the field's default")
    values = {r.key: ("*" if r.changed else " ") + " " + r.key + " = " + _fmt(r.value) for r in rows}
    width = min(max(len(v) for v in values.values()), 60)
    section = None
    for r in rows:
        head = r.key.split(".")[0]
        if head != section and "." in r.key:
            section = head
            print(f"\n[{head}]  {type(getattr(config, head)).__name__}")
        text = values[r.key]
        print(f"{text:<{width}}  # {r.comment or '(no comment in the source)'}")
    return 0
