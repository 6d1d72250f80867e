"""The README's usage examples run as written, against the test server instead of :3000."""

from __future__ import annotations

import re

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

README = ROOT / "README.md"
BASE_URL = "http://localhost:3000"


def usage_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("<!-- usage:start -->"):text.index("<!-- usage:end -->")]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


BLOCKS = usage_blocks()


def test_the_usage_section_has_examples():
    assert len(BLOCKS) >= 3
    assert all(BASE_URL in block for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block, url, capsys):
    code = block.replace(BASE_URL, url)
    exec(compile(code, "README.md usage block", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert printed.strip(), "each example prints what it got"
