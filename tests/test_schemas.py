"""The published schemas and output layout (``scoring.schemas``) against what users read: the README and
``score --help``. No Ray."""

import re
from pathlib import Path

import pytest

from mura_ray import cli
from mura_ray.scoring import schemas

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = re.compile(r"^#{1,4} ", re.M).search(text, start + len(heading))
    return text[start : end.start() if end else len(text)]


def _kind_bullets(section: str) -> dict[str, str]:
    """``- `kind`: ...`` bullets of the README's column list, kind -> its text."""
    bullets = re.findall(r"^- `(\w+)`:(.*?)(?=^- `|^\S|\Z)", section, re.M | re.S)
    return {kind: text for kind, text in bullets}


def test_the_readme_shows_the_output_layout_as_the_module_defines_it():
    assert schemas.layout_text() in _section(README, "### Scoring output")


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_the_readme_names_every_column_of_every_row_kind(kind):
    bullets = _kind_bullets(_section(README, "### Scoring output"))
    assert set(bullets) == set(schemas.KINDS), sorted(bullets)
    named = set(re.findall(r"`(\w+)`", bullets[kind]))
    missing = [c for c in schemas.VIEW_COLUMNS[kind] if c not in named]
    assert not missing, f"README's {kind} bullet lacks {missing}"


def test_score_help_names_every_folder_and_row_kind(capsys):
    with pytest.raises(SystemExit):
        cli.main(["score", "--help"])
    text = capsys.readouterr().out
    folders = [
        p for p, _ in schemas.OUTPUT_LAYOUT if not any(p != q and p.startswith(q) for q, _ in schemas.OUTPUT_LAYOUT)
    ]
    for path in folders:
        assert f"OUT/{path}" in text, path
    for kind in schemas.KINDS:
        assert f"'{kind}'" in text, kind


def test_the_table_schema_has_one_type_per_column_and_every_kind_its_key():
    for kind, columns in schemas.VIEW_COLUMNS.items():
        assert schemas.KEY_OF[kind] in columns
        assert all(c in schemas.SCORES_SCHEMA.names for c in columns)
    assert schemas.SCORES_SCHEMA.names[:2] == ["kind", "key"]
