"""The CLI's start: `--help`, `--version`, usage errors and "did you mean" answer without importing
torch (checked in a fresh interpreter: what it imported, not how long it took), and the parser
built from tcgraph/cli_table.py has exactly the plan options the planner registry defines."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tcgraph import cli_table
from tcgraph.cli import _build_parser
from tcgraph.suggest import close_names, close_paths, did_you_mean

ROOT = Path(__file__).resolve().parents[1]

# Runs each command line through tcgraph.cli.main in one fresh interpreter and reports, as JSON,
# each one's exit code and stderr, then whether torch (or onnx, numpy's heavier neighbours) was imported.
PROBE = """
import contextlib, io, json, sys
import tcgraph.cli
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tcgraph.cli.main(argv)
        except SystemExit as e:  # argparse: --help, --version, its own usage errors
            code = e.code
    results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps({"results": results, "imported": sorted(m for m in ("torch", "onnx", "onnxruntime") if m in sys.modules)}))
"""


def probe(argvs, cache_dir, cwd=ROOT) -> dict:
    env = {"TCGRAPH_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
           "HOME": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory, monkeypatch_module):
    """The CLI table of this checkout, read from the registries once into a fresh cache folder."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch_module.setenv("TCGRAPH_CACHE_DIR", str(folder))
    cli_table.table()
    assert [p.name for p in folder.iterdir()] == [f"cli-table-{cli_table.fingerprint()[:32]}.json"]
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_help_version_and_usage_errors_do_not_import_torch(warm_cache, tmp_path):
    (tmp_path / "digits-fora2").mkdir()
    argvs = [["--help"], ["--version"], ["transform", "--help"], ["sample", "--help"], ["inspect", "--help"],
             ["compare", "--help"], ["export-triton", "--help"], ["serve", "--help"], [], ["transfrom", "--plan", "fora:2"], ["transform", "--stepz", "3"],
             ["transform", "--plan", "tokencash:2"], ["transform", "--model", "digts"],
             ["inspect", "digits-fora"], ["sample", "digits-fora2", "--backend", "onnx"],
             ["transform", "--plan", "fora:2", "--min-psnr", "45"], ["transform", "--plan", "full", "--interval", "3"]]
    found = probe(argvs, warm_cache, cwd=tmp_path)
    assert found["imported"] == []
    r = {tuple(x["argv"]): x for x in found["results"]}
    assert r[("--version",)]["code"] == 0 and r[("--version",)]["out"].strip() == f"tcgraph {cli_table_version()}"
    for cmd in ("transform", "sample", "inspect", "compare", "export-triton", "serve"):
        assert cmd in r[("--help",)]["out"]
    assert "--target-speedup" in r[("transform", "--help")]["out"] and "--reference" in r[("compare", "--help")]["out"]
    expected = {
        (): (2, "the following arguments are required: command"),
        ("transfrom", "--plan", "fora:2"): (2, "unknown command 'transfrom' (did you mean 'transform'?)"),
        ("transform", "--stepz", "3"): (2, "unrecognized arguments: --stepz 3 (did you mean '--steps'?)"),
        ("transform", "--plan", "tokencash:2"): (2, "unknown plan 'tokencash:2' (did you mean 'tokencache' or "
                                                    "'tokencache+l2c'?); available: full (no caching) | fora:N"),
        ("transform", "--model", "digts"): (1, "no pretrained model named 'digts' and no checkpoint file or diffusers "
                                               "folder at digts (did you mean 'digits', 'digits-text' or 'digits-flux'?)"),
        ("inspect", "digits-fora"): (1, "digits-fora is not a tcgraph artifact folder (it does not exist; did you "
                                        "mean digits-fora2?)"),
        ("sample", "digits-fora2", "--backend", "onnx"): (2, "invalid choice: 'onnx'"),
        ("transform", "--plan", "fora:2", "--min-psnr", "45"): (2, "--min-psnr does not apply to plan 'fora'; its "
                                                                  "options are --interval"),
        ("transform", "--plan", "full", "--interval", "3"): (2, "--interval does not apply to plan 'full'; it takes "
                                                               "no options"),
    }
    for argv, (code, message) in expected.items():
        got = r[argv]
        assert got["code"] == code and message in got["err"], (argv, got)
        assert got["err"].strip().splitlines()[-1].startswith(("tcgraph: error: ", "tcgraph transform: error: ",
                                                               "tcgraph sample: error: "))
        assert "Traceback" not in got["err"]


def cli_table_version() -> str:
    from tcgraph.version import __version__

    return __version__


def test_the_parser_has_the_registry_plan_options(warm_cache):
    """Every plan option flag as `tcgraph.plan.add_plan_arguments` makes it: flag, dest, type, metavar, help."""
    from tcgraph.plan import add_plan_arguments

    registry = argparse.ArgumentParser()
    add_plan_arguments(registry)
    sub = next(a for a in _build_parser(["transform"])._actions if isinstance(a, argparse._SubParsersAction))
    dests = {o["dest"] for o in cli_table.table()["plan_options"]}
    mine = {a.option_strings[0]: (a.dest, a.type, a.metavar, a.help, a.default)
            for a in sub.choices["transform"]._actions if a.dest in dests}
    theirs = {a.option_strings[0]: (a.dest, a.type, a.metavar, a.help, a.default)
              for a in registry._actions if a.dest in dests}
    assert mine == theirs and len(mine) >= 15
    from tcgraph.models import PRETRAINED
    from tcgraph.models.config import CONFIGS
    from tcgraph.plan import PLAN_HELP, PLANNERS

    t = cli_table.table()
    assert (t["models"], t["configs"], t["planners"], t["plan_help"]) == (list(PRETRAINED), list(CONFIGS),
                                                                         list(PLANNERS), PLAN_HELP)


def test_the_cache_is_read_while_current_and_read_again_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("TCGRAPH_CACHE_DIR", str(tmp_path / "c"))
    live = cli_table.live_table()
    assert cli_table.table() == live
    path = cli_table.cache_file(cli_table.fingerprint())
    assert json.loads(path.read_text()) == live
    path.write_text(json.dumps({**live, "planners": ["only-this"]}))
    assert cli_table.table()["planners"] == ["only-this"]  # read from the cache, not the registries
    monkeypatch.setattr(cli_table, "fingerprint", lambda: "f" * 64)  # the sources changed
    assert cli_table.table() == live
    cli_table.cache_file("f" * 64).write_text("{damaged")
    assert cli_table.table() == live
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("TCGRAPH_CACHE_DIR", str(blocked / "c"))  # cannot be made: a file is on the way
    assert cli_table.table() == live


def test_did_you_mean(tmp_path):
    assert close_names("DIGTS", ["digits", "digits-text", "fora"]) == ["digits", "digits-text"]
    assert did_you_mean("fro", ["full", "fora"]) == ""
    assert did_you_mean("tayler", ["full", "fora", "taylor"]) == "did you mean 'taylor'?"
    (tmp_path / "out" / "digits-fora2").mkdir(parents=True)
    (tmp_path / "out" / "notes.txt").write_text("")
    assert close_paths(tmp_path / "out" / "digits-fora") == [str(tmp_path / "out" / "digits-fora2")]
    assert close_paths(tmp_path / "ot" / "digits-fora2") == [str(tmp_path / "out" / "digits-fora2")]
    assert close_paths(tmp_path / "out" / "note.txt", folders_only=True) == []
    assert close_paths(tmp_path / "elsewhere" / "x") == []
