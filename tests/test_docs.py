"""The documentation that is generated from code stays in sync with it."""

from pathlib import Path

import adsvc  # noqa: F401
from adsvc.ops.doc import op_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_protos_readme_lists_the_op_table():
    text = (ROOT / "protos" / "README.md").read_text()
    start = text.index("-->\n", text.index("<!-- op table")) + 4
    end = text.index("\n<!-- end op table -->")
    assert text[start:end] == op_table_markdown(), \
        "protos/README.md is out of date: paste the output of `python -m adsvc.ops.doc`"
