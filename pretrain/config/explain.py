"""Every config key with its type, default, value and one-line doc.

A field's doc is the comment on its line in the dataclass's source (or, when
that line has none, the comment lines right above it), so the schema stays
plain dataclasses and the docs sit where a reader of the code sees them.
``pretrain config explain [CONFIG]`` prints the tree this module walks.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any, Iterator

from pretrain.config.typed import RESOLVE


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: doc}`` for the fields ``cls`` itself defines (not inherited ones)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    docs = {}
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        doc = comments.get(node.end_lineno) or comments.get(node.lineno)
        if not doc:  # a comment block right above the field
            above, line = [], node.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            doc = " ".join(a for a in above if a)
        if doc:
            docs[node.target.id] = doc
    return docs


def doc_of(cls: type, name: str) -> str:
    """The doc of field ``name``, looked up along the class's bases."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in field_docs(klass):
            return field_docs(klass)[name]
    return ""


def _type_text(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
        return value if not dataclasses.is_dataclass(value) else None
    return "(required)"


def walk(obj: Any, prefix: str = "") -> Iterator[dict[str, Any]]:
    """One row per leaf key of the dataclass instance ``obj`` (nested sections flattened by dots)."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            section_doc = doc_of(cls, f.name)
            if f.metadata.get(RESOLVE) is not None or section_doc:
                yield {"key": key, "section": True, "doc": section_doc}
            yield from walk(value, key + ".")
            continue
        yield {"key": key, "type": _type_text(hints[f.name]), "default": _default(f), "value": value,
               "doc": doc_of(cls, f.name), "section": False}


def missing_docs(obj: Any) -> list[str]:
    """Keys of ``obj`` without a doc (the schema's own check)."""
    return [row["key"] for row in walk(obj) if not row["section"] and not row["doc"]]


def explain(obj: Any) -> str:
    """The whole tree as text: ``key: type = value  (default ...)  # doc``."""
    out = []
    for row in walk(obj):
        if row["section"]:
            out.append(f"{row['key']}:  # {row['doc']}" if row["doc"] else f"{row['key']}:")
            continue
        changed = "" if row["value"] == row["default"] else f"  (default {row['default']!r})"
        out.append(f"  {row['key']}: {row['type']} = {row['value']!r}{changed}  # {row['doc']}")
    return "\n".join(out)
