"""The README's examples of defenses in a user's own diffusers loop run as written."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(
    r"<!-- readme-example -->\n```python\n(.*?)```", README.read_text(), re.DOTALL
)


def _run(code: str) -> float:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})
    return float(printed.getvalue().strip().splitlines()[-1])


def test_the_readme_has_its_examples() -> None:
    assert len(EXAMPLES) == 2


@pytest.mark.parametrize("code", EXAMPLES, ids=["projection", "agc"])
def test_readme_example_runs(code: str) -> None:
    assert sum("# memguard" in line for line in code.splitlines()) <= 10
    value = _run(code)
    if "ConceptProjection" in code:
        assert value <= 1e-5  # the printed certificate
    else:
        assert 0.0 <= value <= 1.0  # the printed skip rate
