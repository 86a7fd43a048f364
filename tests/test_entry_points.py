"""After a plain ``pip install .`` (no extras), every console script answers ``--help`` under the name the user
typed, or refuses in one line naming the extra to install; the Python API prints no third-party notices."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# pyproject's [project.scripts] table (tomllib is Python 3.11+; the project supports 3.10)
_TABLE = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n")[1].split("\n[")[0]
SCRIPTS: dict[str, str] = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', _TABLE, re.MULTILINE))
# What the extras bring (app, highres, gpu, test) and a plain install lacks.
EXTRA_MODULES = ("gradio", "starlette", "fastapi", "uvicorn", "tifffile", "triton", "playwright", "datasets")

# One fresh process without the extras' modules: each script's --help as its console script would run it, then
# one generation through the Python API, with stderr kept.
_PROBE = textwrap.dedent(
    """
    import contextlib, importlib, io, json, sys

    for name in json.loads(sys.argv[1]):
        sys.modules[name] = None  # as if not installed: import fails and find_spec says None
    answers = {}
    for script, target in json.loads(sys.argv[2]).items():
        module, function = target.split(":")
        out, err, code = io.StringIO(), io.StringIO(), None
        sys.argv = [f"/venv/bin/{script}", "--help"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                getattr(importlib.import_module(module), function)()
            except SystemExit as stop:
                code = stop.code
        answers[script] = [code, out.getvalue(), err.getvalue()]

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        from distlin import build_settings, generate

        generate(build_settings("tiny-sd15", {"steps": 1, "height": 64, "width": 64}, 1))
    print(json.dumps({"answers": answers, "api_stderr": err.getvalue()}))
    """
)


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory: pytest.TempPathFactory) -> dict:
    command = [sys.executable, "-c", _PROBE, json.dumps(EXTRA_MODULES), json.dumps(SCRIPTS)]
    folder = tmp_path_factory.mktemp("plain")
    out = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_answers_help_or_names_its_extra(plain_install: dict, script: str) -> None:
    code, out, err = plain_install["answers"][script]
    if code == 0:
        assert out.startswith(f"usage: {script} "), out[:80]
    else:
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"error: {script} needs ") and "pip install 'distlin[" in err


def test_the_app_without_its_extra_names_it(plain_install: dict) -> None:
    code, _, err = plain_install["answers"]["distlin-app"]
    assert code == 2 and "pip install 'distlin[app]'" in err


def test_the_python_api_prints_no_third_party_notice(plain_install: dict) -> None:
    bar = re.compile(r"\d+/\d+ \[")  # the sampling progress bar, the one thing a run shows on stderr
    notices = [line for line in plain_install["api_stderr"].splitlines() if line.strip() and not bar.search(line)]
    assert notices == []
