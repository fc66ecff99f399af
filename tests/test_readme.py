"""The README's example of a defense in a user's own diffusers loop runs as written."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs() -> None:
    text = README.read_text()
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.DOTALL)
    assert match, "the README lost its tested example"
    code = match.group(1)
    assert sum("# memguard" in line for line in code.splitlines()) <= 10
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})
    skip_rate = float(printed.getvalue().strip().splitlines()[-1])
    assert 0.0 <= skip_rate <= 1.0
