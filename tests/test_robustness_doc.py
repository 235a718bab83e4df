"""docs/robustness.md cites tests by ``tests/file.py::test_name``: every cited test exists, and
every test of the robustness files is cited, so that the page's lists cannot rot."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "robustness.md"
ROBUSTNESS_FILES = ["test_extreme_values.py", "test_dtypes.py", "test_properties.py",
                    "test_bad_input.py", "test_fault_tolerance.py", "test_robustness_doc.py",
                    "test_dtype_contract.py", "test_contract_errors.py", "test_checkpoint.py",
                    "test_train_cli.py"]


def _tests(file):
    tree = ast.parse((ROOT / "tests" / file).read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def _cited():
    return set(re.findall(r"tests/(test_\w+\.py)::(test_\w+)", PAGE.read_text()))


def test_every_cited_test_exists():
    cited = _cited()
    assert len(cited) > 50
    missing = sorted(f"tests/{f}::{t}" for f, t in cited
                     if not (ROOT / "tests" / f).exists() or t not in _tests(f))
    assert not missing, f"docs/robustness.md cites tests that do not exist: {missing}"


def test_every_robustness_test_is_cited():
    cited = _cited()
    uncited = sorted(f"tests/{f}::{t}" for f in ROBUSTNESS_FILES for t in _tests(f)
                     if (f, t) not in cited)
    assert not uncited, f"docs/robustness.md does not list: {uncited}"
