"""The README's commands are run here, in order, so they cannot rot.

Every ```sh and ```python block of README.md carries a marker comment, `<!-- readme-test: NAME -->`:

- `setup`: the two set-up commands (install and run the main job; run the tests). CI runs the
  same two; the tcgraph commands of the first are run here.
- `skip (REASON)`: shown to the reader, not run (it needs a GPU, or calibrates for minutes).
- any other name: run by `test_readme_in_sequence`, in README order, in one fresh folder, after
  the set-up's tcgraph commands, as a reader following the README would. A sh block runs line
  by line (`tcgraph ...` through the installed console script, `python scripts/...` with this
  Python); a python block runs in this process with that folder as the current one. Each must
  succeed, and afterwards every file the commands wrote must lie under git-ignored paths.

`tcgraph serve` runs until Ctrl-C: it is started, waited for until it prints its endpoints, left
running for the next block (the client), then stopped with SIGINT (it must exit 0). Where its
ports are taken, the test gives the server and the client another free base port.
An output block right after a command's block is compared with what the command printed
(`inspect`: every line shown; `compare`: the labels of the lines shown, in order, and every line
that holds no measured number).
"""
from __future__ import annotations

import contextlib
import os
import importlib.util
import io
import json
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import stop

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# A fenced block, optionally after its marker comment; indented blocks (inside a list) count too.
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^>]*?) -->\s*\n)?^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)\n"
                   r"(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
RUNNABLE = ("sh", "python")

# What a block needs besides the base install; without it the block (not the whole run) is skipped.
NEEDS: dict[str, tuple[str, ...]] = {
    "diffusers": ("diffusers",),
    "text": ("diffusers",),
    "flux": ("diffusers",),
    "serve": ("pytriton", "tritonclient"),
    "client": ("pytriton", "tritonclient"),
}


@dataclass
class Block:
    marker: str | None
    lang: str
    body: str
    line: int
    end: int  # offset just past the block in README.md
    output: str | None = None  # the plain ``` block right after it, if any: what the command prints


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks: list[Block] = []
    for m in BLOCK.finditer(text):
        line = text.count("\n", 0, m.start("indent")) + 1
        lang = m.group("lang")
        if lang == "" and blocks and blocks[-1].lang in RUNNABLE and blocks[-1].output is None \
                and text[blocks[-1].end:m.start()].strip() == "":
            blocks[-1].output = m.group("body")
        blocks.append(Block(m.group("marker"), lang, m.group("body"), line, m.end()))
    return blocks


def runnable_blocks() -> list[Block]:
    return [b for b in readme_blocks() if b.lang in RUNNABLE]


def setup_commands() -> list[str]:
    setup = [b for b in runnable_blocks() if b.marker == "setup"]
    assert len(setup) == 1, "README.md must have one marked set-up block"
    return [line for line in setup[0].body.splitlines() if line.strip() and not line.startswith("#")]


def tcgraph_exe() -> list[str]:
    exe = shutil.which("tcgraph")
    return [exe] if exe else [sys.executable, "-m", "tcgraph"]


def test_every_command_block_is_marked():
    """No sh or python block escapes the test: each is the set-up, run, or skipped with a reason."""
    problems = []
    for b in runnable_blocks():
        if b.marker is None:
            problems.append(f"README.md:{b.line}: a ```{b.lang} block without <!-- readme-test: ... -->")
        elif b.marker.startswith("skip") and not re.fullmatch(r"skip \(.+\)", b.marker):
            problems.append(f"README.md:{b.line}: 'skip' needs a reason: <!-- readme-test: skip (REASON) -->")
    assert not problems, "\n".join(problems)
    assert [b.marker for b in runnable_blocks()].count("setup") == 1


def test_setup_is_two_commands_and_ci_runs_the_same():
    install, tests = setup_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests.strip() in ci
    pip_part = install.split("&&")[0].strip()
    assert pip_part.replace("pip install", "python -m pip install") in ci
    extras = re.search(r"\.\[(\w+)\]", pip_part).group(1)
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads pyproject.toml")
    assert extras in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def git_ignored(rel: str) -> bool:
    """Whether the repository's .gitignore ignores `rel` (a path relative to the repository root)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("git or the repository's .git is missing")
    done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "--no-index", "-q", rel], capture_output=True)
    return done.returncode == 0


# ---------------------------------------------------------------------------------------------
# The README in sequence
# ---------------------------------------------------------------------------------------------

def free_base_port() -> int:
    from tcgraph.errors import TcgraphError
    from tcgraph.serve.server import Ports, check_ports

    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000)
        try:
            check_ports(Ports.from_base(base))
            return base
        except TcgraphError:
            continue
    raise RuntimeError("no three consecutive free ports found")


def readme_port_free(port: int) -> bool:
    from tcgraph.errors import TcgraphError
    from tcgraph.serve.server import Ports, check_ports

    try:
        check_ports(Ports.from_base(port))
        return True
    except TcgraphError:
        return False


class Reader:
    """Runs the README's blocks in one folder, as a reader would, and keeps what they printed."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.printed: dict[int, str] = {}  # README line of a block -> its stdout
        self.python_globals: dict[str, dict] = {}  # block marker -> the namespace it ran in
        self.server: subprocess.Popen | None = None
        self.port_map: tuple[str, str] | None = None  # README's port -> the port used
        self.seconds: list[tuple[str, float]] = []  # what ran, and how long it took

    def timed(self, what: str, start: float) -> None:
        self.seconds.append((what, time.monotonic() - start))

    def run(self, block: Block) -> None:
        start = time.monotonic()
        if block.lang == "python":
            self.run_python(block)
        else:
            self.printed[block.line] = "".join(self.run_line(line) for line in block.body.splitlines()
                                               if line.strip() and not line.lstrip().startswith("#"))
        self.timed(f"README.md:{block.line} {block.marker}", start)

    def run_line(self, line: str) -> str:
        argv = shlex.split(line, comments=True)
        if argv[0] == "python":
            argv = [sys.executable, str(ROOT / argv[1]), *argv[2:]]
        else:
            assert argv[0] == "tcgraph", line
            if argv[1] == "serve":
                return self.start_server(argv)
            argv = tcgraph_exe() + argv[1:]
        done = subprocess.run(argv, cwd=self.folder, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        return done.stdout

    def run_python(self, block: Block) -> None:
        code = block.body
        if self.port_map:
            code = code.replace(f"127.0.0.1:{self.port_map[0]}", f"127.0.0.1:{self.port_map[1]}")
        namespace: dict = {"__name__": "__readme__"}
        out = io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"README.md:{block.line}", "exec"), namespace)
        finally:
            os.chdir(cwd)
        self.printed[block.line] = out.getvalue()
        self.python_globals[block.marker] = namespace
        if self.server is not None:  # the block that used the server is done: Ctrl-C
            client = namespace.get("client")
            if client is not None:
                client.close()  # an open connection makes Triton wait at shutdown
            self.stop_server()

    def start_server(self, argv: list[str]) -> str:
        port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
        if not readme_port_free(int(port)):
            new = str(free_base_port())
            argv = [new if a == port else a for a in argv]
            self.port_map = (port, new)
        log = self.folder / "tcgraph-out" / "serve.log"
        self.server_out = open(log, "w+")
        # A reader's terminal delivers Ctrl-C: SIGINT handled as by default, even where this test runs as a
        # background job (whose children inherit SIGINT ignored, which `serve` then keeps, as it should)
        self.server = subprocess.Popen(tcgraph_exe() + argv[1:], cwd=self.folder, stdout=self.server_out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while "stop with Ctrl-C" not in log.read_text():
            if self.server.poll() is not None or time.monotonic() > deadline:
                self.server.kill()
                pytest.fail(f"{shlex.join(argv)} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        return log.read_text()

    def stop_server(self) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        if server.poll() is None and not stop(server, signal.SIGINT, timeout=120):
            pytest.fail("tcgraph serve did not stop within 120 s of Ctrl-C")
        self.server_out.close()
        assert server.returncode == 0, (self.folder / "tcgraph-out" / "serve.log").read_text()[-3000:]


def missing_needs(block: Block) -> str | None:
    for module in NEEDS.get(block.marker or "", ()):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    if block.marker == "text":
        from tcgraph.demos.digits_text import weights_dir

        if not (weights_dir() / "transformer" / "config.json").is_file():
            return f"the digits-text weights are missing at {weights_dir()}: python scripts/train_text_demo.py"
    return None


def check_output(block: Block, printed: str) -> None:
    """The output the README shows under a command is what the command printed: every line for
    `inspect`; for `compare` every line that holds no measured number (time, speedup, quality)."""
    shown = [line.rstrip() for line in block.output.splitlines() if line.strip()]
    got = [line.rstrip() for line in printed.splitlines()]
    if "tcgraph compare" in block.body:  # the lines shown, in order, then those without measured numbers
        printed_labels = iter(line.split()[0] for line in got if line.strip())
        assert all(line.split()[0] in printed_labels for line in shown), (shown, got)
        shown = [line for line in shown if line.split()[0] in ("artifact", "images", "accuracy", "wrote")]
    missing = [line for line in shown if line not in got]
    assert not missing, f"README.md:{block.line}: the output shown is not what the command printed now:\n" \
                        + "\n".join(missing) + "\n--- printed:\n" + printed


@pytest.mark.slow
def test_readme_in_sequence(tmp_path):
    install, _ = setup_commands()
    reader = Reader(tmp_path)
    start = time.monotonic()
    for part in install.split("&&")[1:]:  # the install itself is what CI just did
        reader.run_line(part.strip())
    reader.timed("set-up", start)
    skipped: list[str] = []
    try:
        for block in runnable_blocks():
            if block.marker == "setup" or block.marker.startswith("skip"):
                continue
            reason = missing_needs(block)
            if reason:
                skipped.append(f"{block.marker} (README.md:{block.line}): {reason}")
                continue
            reader.run(block)
            if block.output is not None and block.lang == "sh":
                check_output(block, reader.printed[block.line])
    finally:
        reader.stop_server()
        print("\n".join(f"{s:7.1f} s  {what}" for what, s in reader.seconds))  # shown with -s or on failure

    # The set-up: a PNG grid and an artifact folder.
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 100 for p in pngs)
    assert (tmp_path / "tcgraph-out" / "digits-fora2" / "manifest.json").is_file()
    # The Python API: its artifact, grid and inspect text.
    api = next(b for b in runnable_blocks() if b.marker == "python-api")
    assert "step 4 of 0..49: runs v1" in reader.printed[api.line]
    assert "predicted speedup 2.89x" in reader.printed[api.line]
    assert (tmp_path / "tcgraph-out" / "fora3.png").stat().st_size > 100
    ran = {b.marker for b in runnable_blocks()} - {s.split()[0] for s in skipped}
    if "diffusers" in ran:
        manifest = json.loads((tmp_path / "tcgraph-out" / "digits-diffusers-fora2" / "manifest.json").read_text())
        assert manifest["model_config"]["layout"] == "diffusers"
    if "text" in ran:
        manifest = json.loads((tmp_path / "tcgraph-out" / "digits-text-fora2" / "manifest.json").read_text())
        assert manifest["model_config"]["layout"] == "pixart" and manifest["plan"]["settings"]["text_length"] == 8
    if "flux" in ran:
        manifest = json.loads((tmp_path / "tcgraph-out" / "digits-flux-taylor2" / "manifest.json").read_text())
        assert manifest["model_config"]["layout"] == "flux" and manifest["plan"]["settings"]["guidance"] == "input"
    if "client" in ran:  # the served images are the ones `sample` makes for the same classes and seed
        import numpy as np

        import tcgraph
        from tcgraph.api import to_images

        served = reader.python_globals["client"]["images"]
        expected = to_images(tcgraph.sample(tmp_path / "tcgraph-out" / "digits-fora2", classes="3,3,7", per_class=1,
                                            seed=42, progress=False)[0])
        np.testing.assert_array_equal(served, expected)
    # Everything written lies under git-ignored paths.
    for path in sorted(tmp_path.iterdir()):
        assert git_ignored(path.name + ("/" if path.is_dir() else "")), f"the README's commands wrote {path.name}"
    if skipped:
        pytest.skip("ran the README in sequence except: " + "; ".join(skipped))
