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


def _run(code: str) -> tuple[float, dict]:
    """The last number the example prints, and its variables."""
    printed, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), namespace)
    return float(printed.getvalue().strip().splitlines()[-1]), namespace


def test_the_readme_has_its_examples() -> None:
    assert len(EXAMPLES) == 3


@pytest.mark.parametrize("code", EXAMPLES, ids=["projection", "patch", "agc"])
def test_readme_example_runs(code: str) -> None:
    assert sum("# memguard" in line for line in code.splitlines()) <= 10
    value, namespace = _run(code)
    if "TextProjection" in code:
        assert value <= 1e-5  # the printed certificate
        assert not namespace["projection"]._handles  # detached
    elif "PatchProjection" in code:  # the printed share of the gradient removed
        assert namespace["fit"].recall == 1.0
        assert 0 < value < 0.5  # the concept's images lost their square, the others nothing
        assert not namespace["projection"]._handles
    else:  # the printed skip rate is that of the 16 samples the loop showed AGC
        agc = namespace["agc"]
        assert agc.seen == 16 and value == agc.skipped / 16
        assert 0 < int(agc.bank.count_nonzero()) <= 16  # one entry per timestep drawn
