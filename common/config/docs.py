"""Markdown reference of the structured configs, read from the dataclasses and their source.

Every knob's type and default come from the dataclass field, its explanation from the comment
beside its declaration (the comment lines right above it and a trailing comment on its own
line), so docs/configuration.md cannot say something the code does not. The renderer knows
nothing of particular sections: ``ctfed.simulations.config_docs`` hands it the roots
(common never imports simulations).
"""

from __future__ import annotations

import ast
import enum
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import MISSING as DATACLASS_MISSING
from dataclasses import Field, dataclass, fields, is_dataclass
from typing import Any, Sequence

from omegaconf import MISSING as OMEGACONF_MISSING


@dataclass(frozen=True)
class ConfigRoot:
    """One root config to document: a heading, a paragraph on who reads it, the dataclass."""

    title: str
    intro: str
    schema: type
    # Prefix of every key, e.g. "policy" to document a section on its own; "": a root's keys.
    key_prefix: str = ""
    # Top-level fields to mark, e.g. those the coordinator reads as well: {field name: note}.
    section_notes: typing.Mapping[str, str] | None = None


def _source_comments(source: str) -> tuple[dict[int, str], set[int]]:
    """{line number: comment text} of every comment, and the lines holding nothing but one."""
    comments: dict[int, str] = {}
    standalone: set[int] = set()
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        row = token.start[0]
        comments[row] = token.string.lstrip("#").strip()
        if lines[row - 1].strip().startswith("#"):
            standalone.add(row)
    return comments, standalone


def member_comments(cls: type) -> dict[str, str]:
    """{attribute name: the comment beside its declaration} for a class's annotated fields and
    plain assignments (enum members): the comment lines right above it (up to a blank or code
    line) followed by a comment on its own line(s)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments, standalone = _source_comments(source)
    class_def = ast.parse(source).body[0]
    assert isinstance(class_def, ast.ClassDef)
    found: dict[str, str] = {}
    for statement in class_def.body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            name = statement.target.id
        elif (isinstance(statement, ast.Assign) and len(statement.targets) == 1
              and isinstance(statement.targets[0], ast.Name)):
            name = statement.targets[0].id
        else:
            continue
        above: list[str] = []
        row = statement.lineno - 1
        while row in standalone:
            above.insert(0, comments[row])
            row -= 1
        end = statement.end_lineno or statement.lineno
        trailing = [comments[r] for r in range(statement.lineno, end + 1) if r in comments and r not in standalone]
        text = " ".join(part for part in above + trailing if part)
        if text:
            found[name] = text
    return found


def _docstring(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    # A dataclass without a docstring gets a generated signature as its __doc__.
    if doc.startswith(f"{cls.__name__}("):
        return ""
    return doc


def _format_value(value: Any) -> str:
    """A default as one would write it in an override or YAML file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, str):
        return '"' + value + '"' if value == "" or value != value.strip() else value
    if isinstance(value, float):
        return repr(value)
    if is_dataclass(value):
        return "{" + ", ".join(f"{f.name}: {_format_value(getattr(value, f.name))}" for f in fields(value)) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_format_value(item)}" for key, item in value.items()) + "}"
    return str(value)


def _default(spec: Field) -> Any:
    if spec.default is not DATACLASS_MISSING:
        return spec.default
    if spec.default_factory is not DATACLASS_MISSING:  # type: ignore[misc]
        return spec.default_factory()  # type: ignore[misc]
    return OMEGACONF_MISSING


def _inner_types(annotation: Any) -> list[Any]:
    """The classes an annotation names: ``Optional[X]`` -> X, ``list[Y]`` -> Y."""
    args = typing.get_args(annotation)
    if not args:
        return [annotation]
    return [inner for arg in args if arg is not type(None) for inner in _inner_types(arg)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    # Backticks inside an inline code span would end it: use a double-backtick span then.
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _module_path(cls: type) -> str:
    # ctfed.<folder>.<module> lives in <folder>/<module>.py of the repository (pyproject's package-dir).
    return cls.__module__.removeprefix("ctfed.").replace(".", "/") + ".py"


def _enum_choices(enum_class: type[enum.Enum]) -> str:
    notes = member_comments(enum_class)
    choices = []
    for member in enum_class:
        note = notes.get(member.name)
        choices.append(f"`{member.value}`" + (f" ({note})" if note else ""))
    return "one of " + ", ".join(choices)


def _is_section(annotation: Any) -> bool:
    """A field that is one nested dataclass (a section of its own, not a list of entries)."""
    return is_dataclass(annotation) and isinstance(annotation, type)


class _Renderer:
    def __init__(self) -> None:
        self.out: list[str] = []

    def rows(self, schema: type, key: str, specs: Sequence[Field], notes: typing.Mapping[str, str],
             defaults: Any = None) -> list[tuple[str, type, Any]]:
        """One table row per field in ``specs``; returns the nested sections to render after it.

        ``defaults``: the instance the parent's default builds (its default_factory), whose
        values are this section's defaults there (``finetune`` in a run is not FinetuneConfig's
        own default); None: the fields' own defaults."""
        comments = member_comments_with_bases(schema)
        hints = typing.get_type_hints(schema)
        nested: list[tuple[str, type, Any]] = []
        for spec in specs:
            full_key = f"{key}.{spec.name}" if key else spec.name
            inner = _inner_types(hints[spec.name])
            dataclass_inner = next((t for t in inner if is_dataclass(t)), None)
            enum_inner = next((t for t in inner if isinstance(t, type) and issubclass(t, enum.Enum)), None)
            default = _default(spec) if defaults is None else getattr(defaults, spec.name)
            description = " ".join(part for part in (comments.get(spec.name, ""), notes.get(spec.name, "")) if part)
            is_list = False
            if dataclass_inner is not None:
                is_list = typing.get_origin(hints[spec.name]) in (list, typing.List)
                sub_key = f"{full_key}[]" if is_list else full_key
                # A list's entries start from their class's own defaults; a section from this one's.
                nested.append((sub_key, dataclass_inner, None if is_list else default))
                description = (description + " " if description else "") + f"Fields: `{sub_key}` below."
            if enum_inner is not None:
                choices = _enum_choices(enum_inner)
                if not description:
                    description = choices[0].upper() + choices[1:]
                else:
                    description += (" O" if description.endswith(".") else "; o") + choices[1:]
            if default == OMEGACONF_MISSING:
                default_text = "required"
            elif dataclass_inner is not None and not is_list:
                default_text = "its fields' defaults"
            else:
                default_text = _code(_format_value(default))
            type_text = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
            self.out.append(f"| `{full_key}` | {_code(str(type_text))} | {_cell(default_text)} | {_cell(description)} |")
        return nested

    def table(self, schema: type, key: str, specs: Sequence[Field], level: int,
              notes: typing.Mapping[str, str] | None = None, defaults: Any = None) -> None:
        self.out.append("| key | type | default | what it is |")
        self.out.append("|---|---|---|---|")
        nested = self.rows(schema, key, specs, notes or {}, defaults)
        self.out.append("")
        for sub_key, sub_schema, sub_defaults in nested:
            self.section(sub_key, sub_schema, min(level + 1, 4), defaults=sub_defaults)

    def section(self, key: str, schema: type, level: int, note: str = "", defaults: Any = None) -> None:
        self.out.append(f"{'#' * level} `{key}`")
        self.out.append("")
        self.out.append(f"`{schema.__name__}` ({_module_path(schema)}).{(' ' + note) if note else ''}")
        doc = _docstring(schema)
        if doc:
            self.out.append("")
            self.out.append(doc)
        self.out.append("")
        self.table(schema, key, fields(schema), level, defaults=defaults)

    def root(self, root: ConfigRoot) -> None:
        self.out.append(f"## {root.title}")
        self.out.append("")
        self.out.append(root.intro)
        self.out.append("")
        notes = root.section_notes or {}
        hints = typing.get_type_hints(root.schema)
        comments = member_comments_with_bases(root.schema)
        prefix = root.key_prefix.rstrip(".")
        top_level = [spec for spec in fields(root.schema) if not _is_section(hints[spec.name])]
        sections = [spec for spec in fields(root.schema) if _is_section(hints[spec.name])]
        if top_level:
            self.table(root.schema, prefix, top_level, 2, notes)
        for spec in sections:
            note = " ".join(part for part in (comments.get(spec.name, ""), notes.get(spec.name, "")) if part)
            key = f"{prefix}.{spec.name}" if prefix else spec.name
            # The root's own default of the section, built alone: the root's __post_init__ (rules
            # between sections, e.g. train.schedule_rounds following federation.rounds) stays out.
            self.section(key, hints[spec.name], 3, note, defaults=_default(spec))


def member_comments_with_bases(cls: type) -> dict[str, str]:
    """``member_comments`` of a class and the dataclasses it extends (a subclass's own win)."""
    merged: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base is object or not is_dataclass(base):
            continue
        merged.update(member_comments(base))
    return merged


def render_config_docs(header: str, roots: Sequence[ConfigRoot], footer: str = "") -> str:
    """The whole Markdown page: ``header``, one part per root (a table of its top-level keys,
    then one table per section and sub-section), ``footer``."""
    renderer = _Renderer()
    renderer.out.append(header.rstrip())
    renderer.out.append("")
    for root in roots:
        renderer.root(root)
    if footer:
        renderer.out.append(footer.rstrip())
        renderer.out.append("")
    return "\n".join(renderer.out).rstrip() + "\n"
