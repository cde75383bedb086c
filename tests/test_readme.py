"""The README's set-up commands are run here, so they cannot rot."""
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- readme-test: setup -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README.md lost its marked set-up block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_setup_is_two_commands_and_ci_runs_the_same():
    install, tests = setup_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci
    pip_part = install.split("&&")[0].strip()
    assert pip_part.replace("pip install", "python -m pip install") in ci
    extras = re.search(r"\.\[(\w+)\]", pip_part).group(1)
    assert extras in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_setup_commands_run(tmp_path):
    """Run every tcgraph command of the first set-up line (the install is what CI just did)."""
    install, _ = setup_commands()
    exe = shutil.which("tcgraph")
    prefix = [exe] if exe else [sys.executable, "-m", "tcgraph"]
    for part in install.split("&&")[1:]:
        argv = shlex.split(part)
        assert argv[0] == "tcgraph", part
        done = subprocess.run(prefix + argv[1:], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 100 for p in pngs)
    assert list((tmp_path / "tcgraph-out").glob("*/manifest.json"))


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"The Python API mirrors the CLI:\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its Python API example"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert (tmp_path / "grid.png").stat().st_size > 100
    out = capsys.readouterr().out
    assert "step 4 of 0..49: runs v0" in out and "predicted speedup 1.98x" in out


def run_marked_block(marker: str, cwd) -> None:
    """Run the README's `<!-- readme-test: MARKER -->` sh block line by line in `cwd` (tcgraph and
    python scripts of this repository), each line exiting 0."""
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- readme-test: {marker} -->\s*```sh\n(.*?)```", text, re.S)
    assert block, f"README.md lost its marked {marker} block"
    exe = shutil.which("tcgraph")
    for line in (ln for ln in block.group(1).splitlines() if ln.strip()):
        argv = shlex.split(line)
        if argv[0] == "python":
            argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        else:
            assert argv[0] == "tcgraph", line
            argv = ([exe] if exe else [sys.executable, "-m", "tcgraph"]) + argv[1:]
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]


def test_diffusers_commands_run(tmp_path):
    """The README's diffusers block: the demo written as a diffusers pipeline, transformed, sampled."""
    pytest.importorskip("diffusers")
    run_marked_block("diffusers", tmp_path)
    assert (tmp_path / "diffusers.png").stat().st_size > 100
    manifest = json.loads(next((tmp_path / "tcgraph-out").glob("*/manifest.json")).read_text())
    assert manifest["model_config"]["layout"] == "diffusers"


def test_text_demo_commands_run(tmp_path):
    """The README's text block: the digits-text demo transformed and sampled from prompts."""
    pytest.importorskip("diffusers")
    from tcgraph.demos.digits_text import weights_dir

    if not (weights_dir() / "transformer" / "config.json").is_file():
        pytest.skip(f"the digits-text weights are missing at {weights_dir()}: python scripts/train_text_demo.py")
    run_marked_block("text", tmp_path)
    assert (tmp_path / "text.png").stat().st_size > 100
    manifest = json.loads(next((tmp_path / "tcgraph-out").glob("*/manifest.json")).read_text())
    assert manifest["model_config"]["layout"] == "pixart" and manifest["plan"]["settings"]["text_length"] == 8
