"""The option table users read in docs/ is the one the code carries."""

from pathlib import Path

from cloudfs.cli import build_parser
from cloudfs.options import OPTIONS, markdown_table


def test_docs_options_match_code() -> None:
    doc = Path(__file__).parents[2] / "docs" / "options.md"
    assert doc.read_text() == markdown_table(), "regenerate: python -m cloudfs.options > docs/options.md"


def test_help_lists_every_option() -> None:
    mount = build_parser()._subparsers._group_actions[0].choices["mount"]  # type: ignore[union-attr]
    text = mount.format_help()
    for name in OPTIONS:
        assert name in text
