"""docs/configuration.md is what the generator writes from the structured configs, and the
generator reads each knob's comment, type and default from the dataclass source."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ctfed.common.config.docs import ConfigRoot, member_comments, render_config_docs
from ctfed.simulations.config_docs import GENERATOR, render

REPO = Path(__file__).resolve().parents[2]


def test_committed_configuration_page_is_what_the_generator_writes() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), f"docs/configuration.md is out of date: run `{GENERATOR}`"


def test_every_knob_of_both_roots_is_documented() -> None:
    page = render()
    # One knob per section of each root, including nested sections and list entries.
    for key in ("federation.rounds", "train.augment.blur_prob", "preprocess.windows[].level",
                "simulation.faults[].kind", "secagg.num_shares", "synth.sites", "label_efficiency.tasks",
                "site_id", "policy.max_epsilon", "max_wait_s"):
        assert f"| `{key}` |" in page, key


# A table cell ends at a pipe that is not escaped (descriptions escape theirs with a backslash).
_CELL_BORDER = re.compile(r"(?<!\\)\|")
_KNOB_TABLE_HEADER = "| key | type | default | what it is |"


def _undescribed_knobs(page: str) -> list[str]:
    """Keys of the knob rows whose last cell ("what it is") is empty (rows of the knob tables
    only: the page's other tables, e.g. the presets', have other columns)."""
    undescribed = []
    in_knob_table = False
    for line in page.splitlines():
        if line == _KNOB_TABLE_HEADER:
            in_knob_table = True
        elif not line.startswith("|"):
            in_knob_table = False
        if not (in_knob_table and line.startswith("| `")):
            continue
        cells = [cell.strip() for cell in _CELL_BORDER.split(line)[1:-1]]
        assert len(cells) == 4, f"a knob row should have 4 cells: {line}"
        if not cells[3]:
            undescribed.append(cells[0].strip("`"))
    return undescribed


def test_every_knob_is_explained_where_it_is_declared() -> None:
    # The style guide: each knob carries a comment at its declaration, which the page shows.
    undescribed = _undescribed_knobs(render())
    assert not undescribed, (
        f"{len(undescribed)} knob(s) without a comment above or beside their declaration "
        f"(common/config/*.py, simulations/config.py): {', '.join(undescribed)}"
    )


def test_an_uncommented_knob_is_reported_by_its_key() -> None:
    # The check itself must catch a row with no description (the toy root's `plain` and `maybe`).
    page = render_config_docs("# Toy", [ConfigRoot(title="Toy", intro="A toy root.", schema=_Root)])
    assert _undescribed_knobs(page) == ["plain", "maybe"]


class _Colour(str, enum.Enum):
    """A toy choice."""

    red = "red"  # warm
    blue = "blue"


@dataclass
class _Inner:
    """Inner section."""

    # Above the field,
    # on two lines.
    depth: int = 3


@dataclass
class _Root:
    size: int = 4  # trailing comment
    # Comment block of a list knob.
    names: list[str] = field(default_factory=lambda: ["a", "b"])

    plain: float = 0.5
    colour: _Colour = _Colour.red
    maybe: Optional[bool] = None
    inner: _Inner = field(default_factory=_Inner)
    inners: list[_Inner] = field(default_factory=list)


def test_comments_are_read_from_above_and_beside_each_field() -> None:
    comments = member_comments(_Root)
    assert comments["size"] == "trailing comment"
    assert comments["names"] == "Comment block of a list knob."
    assert "plain" not in comments  # a blank line separates it from the comment above names
    assert member_comments(_Inner) == {"depth": "Above the field, on two lines."}
    assert member_comments(_Colour) == {"red": "warm"}


def test_rendered_rows_carry_type_default_choices_and_nested_sections() -> None:
    page = render_config_docs("# Toy", [ConfigRoot(title="Toy", intro="A toy root.", schema=_Root)])
    assert "| `size` | `int` | `4` | trailing comment |" in page
    assert "| `names` | `list[str]` | `[a, b]` | Comment block of a list knob. |" in page
    assert "| `colour` | `_Colour` | `red` | One of `red` (warm), `blue` |" in page
    assert "| `maybe` | `Optional[bool]` | `null` |" in page
    assert "### `inner`" in page and "| `inner.depth` | `int` | `3` | Above the field, on two lines. |" in page
    assert "### `inners[]`" in page


def _inner_with_depth_7() -> _Inner:
    return _Inner(depth=7)


@dataclass
class _RootWithFactory:
    inner: _Inner = field(default_factory=_inner_with_depth_7)


def test_a_section_shows_the_defaults_its_parent_builds() -> None:
    page = render_config_docs("# Toy", [ConfigRoot(title="Toy", intro="A toy root.", schema=_RootWithFactory)])
    assert "| `inner.depth` | `int` | `7` |" in page
    # The real case: a run's phase-2 task is the synthetic hospitals' "any", not FinetuneConfig's "label".
    assert "| `finetune.label_names` | `list[str]` | `[any]` |" in render()
