"""docs/verifying.md runs as written: its ```python blocks, in order, as one script, and the
pytest test it ends with (the one a reader pastes into their suite) passes."""
import pathlib
import re
import traceback

import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "verifying.md"
TEST_NAME = "test_lse_vjp"   # the test the tutorial ends with


def python_blocks(text):
    """The ```python blocks of ``text`` with the line each starts on."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1))
            for m in re.finditer(r"^```python[ \t]*\n(.*?)^```", text, re.S | re.M)]


@pytest.fixture(scope="module")
def tutorial():
    """Run every block in one fresh namespace; fail naming the block that raised."""
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert blocks, f"no ```python block in {DOC}"
    namespace = {"__name__": "verifying_tutorial"}
    for k, (line, code) in enumerate(blocks, 1):
        # pad with blank lines so tracebacks give the line number in the .md file
        source = "\n" * (line - 1) + code
        error = None
        try:
            exec(compile(source, str(DOC), "exec"), namespace)
        except Exception as e:  # noqa: BLE001 — report which block broke, then fail
            error = e
        if error is not None:
            first = code.strip().splitlines()[0] if code.strip() else ""
            pytest.fail(f"docs/verifying.md: python block {k} of {len(blocks)} (line {line}: "
                        f"{first!r}) raised {type(error).__name__}: {error}\n\n"
                        + "".join(traceback.format_exception(error)), pytrace=False)
    return namespace, blocks


def test_every_block_runs(tutorial):
    namespace, blocks = tutorial
    assert len(blocks) >= 8
    assert namespace["report"].passed              # the tutorial's own claims hold
    assert not namespace["bad"].passed


def test_the_pasted_test_exists_and_passes(tutorial):
    namespace, blocks = tutorial
    assert TEST_NAME in namespace, f"the tutorial no longer defines {TEST_NAME}()"
    assert f"def {TEST_NAME}(" in blocks[-1][1], f"{TEST_NAME} must be in the last block"
    assert "assert_vjp_correct" in blocks[-1][1]
    namespace[TEST_NAME]()                         # raises AssertionError if a check fails


def test_the_pasted_test_would_catch_a_mistake(tutorial):
    """The pasted test is not vacuous: with the backward of section 5 it fails."""
    namespace, _ = tutorial
    namespace = dict(namespace)
    namespace["lse"] = namespace["lse_unnormalised"]
    test = type(namespace[TEST_NAME])(namespace[TEST_NAME].__code__, namespace)
    with pytest.raises(AssertionError, match="lse_unnormalised: x vs autodiff"):
        test()
