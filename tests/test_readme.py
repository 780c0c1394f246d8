"""Every ```python snippet in README.md runs as written (on CPU, small sizes)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 3, "README.md should show usage snippets"


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=lambda i: f"snippet{i}")
def test_readme_snippet_runs(index):
    code = SNIPPETS[index]
    exec(compile(code, f"README.md:snippet{index}", "exec"), {"__name__": f"readme_snippet_{index}"})
