"""The documentation site (mkdocs.yml, docs/) builds strictly, and every example in it runs.

* ``mkdocs build --strict`` fails on a broken link, a page missing from the nav, a missing
  anchor, and an unresolved cross-reference to the API (``[text][jbackprop.modules.linear._mm_bwd]``)
  or to a test (``[text][test_linear.test_mm_backward_formulas]``): renaming a function or a
  test that a page cites breaks the build.
* Every ```python block of every page in docs/ runs: a page's blocks in order, as one script,
  in a fresh Python process (working directory a temporary folder, JAX on the CPU). A failure
  names the page, the block, the line in the .md file and the error. ```text blocks (output,
  notation) are not run. ```bash blocks are not run either; each ``jbackprop ...`` command in
  them is only parsed, by the real command-line parser. docs/verifying.md is run by
  tests/test_verifying_tutorial.py, with more checks, and not twice.
* docs/make_figures.py draws the data-flow figures that the pages show.
"""
import json
import os
import pathlib
import re
import shlex
import struct
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
RUN_ELSEWHERE = {"verifying.md": "tests/test_verifying_tutorial.py"}
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```", re.S | re.M)

# Runs one page's blocks in one namespace; tracebacks point at lines of the .md file.
RUNNER = textwrap.dedent("""
    import json, sys, traceback
    page, blocks = sys.argv[1], json.load(open(sys.argv[2]))
    namespace = {"__name__": "__main__"}
    for k, (line, code) in enumerate(blocks, 1):
        try:
            exec(compile("\\n" * (line - 1) + code, page, "exec"), namespace)
        except BaseException as e:
            print(f"{page}: python block {k} of {len(blocks)} (line {line}) raised "
                  f"{type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc()
            sys.exit(1)
""")


def fenced_blocks(text, language):
    """``(line, code)`` of each fenced block of ``language``; ``line`` is its first code line."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in FENCE.finditer(text) if m.group(1) == language]


def env():
    e = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", NO_MKDOCS_2_WARNING="1")
    e.pop("XLA_FLAGS", None)          # a page that wants several CPU devices sets its own
    return e


def test_site_builds_strictly(tmp_path):
    # no --quiet: it hides the warnings from the count that makes --strict fail
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        log = [line for line in (done.stdout + done.stderr).splitlines()
               if not line.startswith("INFO")]
        pytest.fail("mkdocs build --strict failed:\n" + "\n".join(log), pytrace=False)
    html = (tmp_path / "site" / "linear" / "index.html").read_text(encoding="utf-8")
    assert '<div class="arithmatex">' in html          # display math reaches KaTeX
    api = (tmp_path / "site" / "api" / "linear" / "index.html").read_text(encoding="utf-8")
    assert 'id="jbackprop.modules.linear._mm_bwd"' in api and 'id="test_linear.test_mm_backward_formulas"' in api


@pytest.mark.parametrize("page", [p for p in PAGES if p not in RUN_ELSEWHERE and
                                  fenced_blocks((DOCS / p).read_text(encoding="utf-8"), "python")])
def test_python_blocks_run(page, tmp_path):
    blocks = fenced_blocks((DOCS / page).read_text(encoding="utf-8"), "python")
    (tmp_path / "blocks.json").write_text(json.dumps(blocks), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", RUNNER, f"docs/{page}", "blocks.json"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(done.stderr[-6000:], pytrace=False)


@pytest.mark.parametrize("page", sorted(RUN_ELSEWHERE))
def test_pages_with_their_own_test_are_run_there(page):
    runner = (ROOT / RUN_ELSEWHERE[page]).read_text(encoding="utf-8")
    assert f'"{page}"' in runner, f"{RUN_ELSEWHERE[page]} no longer runs docs/{page}"
    assert fenced_blocks((DOCS / page).read_text(encoding="utf-8"), "python")


COMMAND = re.compile(r"(?:^|&&|\|\||;|\bdo\b|\bthen\b)\s*jbackprop\b([^;&|#\n]*)", re.M)


def jbackprop_commands(text):
    """The arguments of every ``jbackprop ...`` command that starts a command of a ```bash
    block (a line, or after ``&&``, ``;``, ``||``, ``do``, ``then``), up to ``;&|#``."""
    commands = []
    for _, code in fenced_blocks(text, "bash"):
        for m in COMMAND.finditer(code.replace("\\\n", " ")):
            words = shlex.split(m.group(1))
            if not any("$" in w for w in words):    # a shell variable: cannot be parsed here
                commands.append(words)
    return commands


class _Parsed(Exception):
    pass


def test_jbackprop_commands_in_the_docs_parse(monkeypatch):
    import argparse

    from jbackprop import cli

    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    texts = {p: (DOCS / p).read_text(encoding="utf-8") for p in PAGES}
    texts["README.md"] = (ROOT / "README.md").read_text(encoding="utf-8")
    checked = 0
    for page, text in texts.items():
        for argv in jbackprop_commands(text):
            try:
                cli.main(argv)
            except _Parsed:
                checked += 1
            except SystemExit as e:
                pytest.fail(f"{page}: `jbackprop {shlex.join(argv)}` does not parse (exit {e})")
    assert checked >= 5


def png_size(path):
    head = pathlib.Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_figures_are_drawn_by_make_figures(tmp_path):
    done = subprocess.run([sys.executable, str(DOCS / "make_figures.py"), str(tmp_path)],
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("mlp_dataflow.png", "residual_dataflow.png"):
        width, height = png_size(tmp_path / name)
        assert width > 800 and height > 250
        # the committed picture is the script's current output (same layout, same size)
        assert png_size(DOCS / "images" / name) == (width, height), \
            f"docs/images/{name} is stale: run python docs/make_figures.py"


def test_readme_links_the_site():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/index.md)" in readme and "mkdocs serve" in readme
