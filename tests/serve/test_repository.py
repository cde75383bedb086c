"""`tcgraph export-triton`: the repository's layout and config, the hash-checked copy, one clear
error for each bad input, and never a half-written repository or a folder that is not tcgraph's
replaced. No server needed (the server tests are in test_triton.py)."""
from __future__ import annotations

import errno
import os
import sys

import pytest

from tcgraph.cli import main
from tcgraph.errors import TcgraphError
from tcgraph.serve import repository
from tcgraph.serve.repository import MARKER, TEMPLATE, check_repository, write_repository
from tcgraph.serve.triton import find_triton, package_paths


def siblings(path):
    """Everything in the parent of `path` (hidden temporaries included)."""
    return sorted(os.listdir(path.parent))


def test_export_triton_writes_a_checked_repository(serve_artifact, tmp_path, capsys):
    repo = tmp_path / "models"
    assert main(["export-triton", str(serve_artifact), str(repo), "--instances", "2",
                 "--max-queue-delay-us", "500"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {repo}"
    model = repo / "digits-fora2"
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file() and "artifact" not in p.parts) \
        == ["digits-fora2/1/model.py", "digits-fora2/config.pbtxt", MARKER]
    config = (model / "config.pbtxt").read_text()
    for line in ('name: "digits-fora2"', 'backend: "python"', "max_batch_size: 2",  # images, not guidance halves
                 '{ name: "CLASSES" data_type: TYPE_INT64 dims: [ 1 ] }', '{ name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] }',
                 '{ name: "IMAGES" data_type: TYPE_UINT8 dims: [ 16, 16, 1 ] }', "preferred_batch_size: [ 2 ]",
                 "max_queue_delay_microseconds: 500", "instance_group [ { count: 2 kind: KIND_CPU } ]",
                 'parameters: { key: "backend" value: { string_value: "ort" } }'):
        assert line in config, line
    assert (model / "1" / "model.py").read_bytes() == TEMPLATE.read_bytes()
    copied = sorted(p.relative_to(model / "1" / "artifact") for p in (model / "1" / "artifact").rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(serve_artifact) for p in serve_artifact.rglob("*") if p.is_file())
    marker = check_repository(repo)
    assert marker["model"] == "digits-fora2" and marker["version"] == "1"
    assert siblings(repo) == ["models"]  # no temporary left beside it


def test_options_change_the_config(serve_artifact, tmp_path):
    repo = write_repository(serve_artifact, tmp_path / "r", name="dit_1", dynamic_batching=False, backend="torch")
    config = (repo / "dit_1" / "config.pbtxt").read_text()
    assert "dynamic_batching" not in config and 'string_value: "torch"' in config and 'name: "dit_1"' in config


@pytest.mark.parametrize("argv, message, code", [
    (["{tmp}/missing", "{tmp}/r"], "missing is not a tcgraph artifact folder", 1),
    (["{art}", "{tmp}/plain"], "plain already exists (and is not a tcgraph model repository); tcgraph writes only "
                               "new folders or replaces its own repositories", 1),
    (["{art}", "{tmp}/plain", "--force"], "plain is not a tcgraph model repository (no tcgraph-repository.json in "
                                          "it); --force replaces only repositories tcgraph wrote", 2),
    (["{art}", "{tmp}/file.txt", "--force"], "is not a tcgraph model repository", 2),
    (["{art}", "{tmp}/r", "--instances", "0"], "instances (--instances) must be an integer in 1..1024, got 0", 2),
    (["{art}", "{tmp}/r", "--max-queue-delay-us", "-1"], "max_queue_delay_us (--max-queue-delay-us) must be", 2),
    (["{art}", "{tmp}/r", "--name", "../up"], "model name (--name) '../up' is not usable", 2),
    (["{art}", "{tmp}/file.txt/r"], "file.txt is a file, not a folder", 1),
])
def test_bad_input_gets_one_clear_error_and_nothing_is_touched(serve_artifact, tmp_path, capsys, argv, message, code):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "mine.txt").write_text("not tcgraph's")
    (tmp_path / "file.txt").write_text("a file")
    before = siblings(tmp_path / "x")
    assert main(["export-triton", *[a.format(art=serve_artifact, tmp=tmp_path) for a in argv]]) == code
    err = capsys.readouterr().err
    assert err.startswith("tcgraph: error: ") and message in err and "Traceback" not in err
    assert siblings(tmp_path / "x") == before
    assert (tmp_path / "plain" / "mine.txt").read_text() == "not tcgraph's"
    assert (tmp_path / "file.txt").read_text() == "a file"


def test_force_replaces_only_a_tcgraph_repository(serve_artifact, tmp_path, capsys):
    repo = write_repository(serve_artifact, tmp_path / "r")
    assert main(["export-triton", str(serve_artifact), str(repo)]) == 1
    assert "r already exists (a tcgraph model repository); pass --force to replace it" in capsys.readouterr().err
    assert main(["export-triton", str(serve_artifact), str(repo), "--force", "--instances", "3"]) == 0
    assert "count: 3" in (repo / "digits-fora2" / "config.pbtxt").read_text()
    check_repository(repo)
    assert siblings(repo) == ["r"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_export_leaves_nothing_behind(serve_artifact, tmp_path, monkeypatch, failure):
    old = write_repository(serve_artifact, tmp_path / "old")
    marker = (old / MARKER).read_text()

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(repository.shutil, "copyfile", broken)  # the model.py template, after the artifact copy
    with pytest.raises(TcgraphError if isinstance(failure, OSError) else KeyboardInterrupt) as e:
        write_repository(serve_artifact, tmp_path / "new")
    if isinstance(failure, OSError):
        assert str(e.value).startswith(f"cannot write {tmp_path / 'new'}: [Errno 28] No space left on device; free space")
    with pytest.raises(TcgraphError if isinstance(failure, OSError) else KeyboardInterrupt):
        write_repository(serve_artifact, old, force=True)
    assert sorted(os.listdir(tmp_path)) == ["old"]  # no new repository, no temporary, the old one as it was
    assert (old / MARKER).read_text() == marker
    check_repository(old)


def test_check_repository_names_the_damaged_file(serve_artifact, tmp_path):
    repo = write_repository(serve_artifact, tmp_path / "r")
    model_py = repo / "digits-fora2" / "1" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# edited\n")
    with pytest.raises(TcgraphError, match="digits-fora2/1/model.py changed since it was written"):
        check_repository(repo)
    repo = write_repository(serve_artifact, tmp_path / "r2")
    weights = repo / "digits-fora2" / "1" / "artifact" / "variants" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(TcgraphError, match="weights.bin"):
        check_repository(repo)
    with pytest.raises(TcgraphError, match="is not a tcgraph model repository"):
        check_repository(serve_artifact)


def test_serve_without_the_extra_says_how_to_install_it(serve_artifact, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytriton", None)  # `import pytriton` raises ImportError
    with pytest.raises(TcgraphError, match=r"install the serve extra: pip install 'tcgraph\[serve\]'"):
        find_triton()
    assert main(["serve", str(serve_artifact)]) == 1
    err = capsys.readouterr().err
    assert err == ("tcgraph: error: Triton Inference Server is not installed; install the serve extra: "
                   "pip install 'tcgraph[serve]' (nvidia-pytriton, tritonclient)\n")


def test_the_stub_imports_this_tcgraph(serve_artifact):
    import tcgraph

    paths = package_paths()
    assert str(tcgraph.__path__[0]).rsplit("/", 1)[0] in paths or any(
        os.path.isdir(os.path.join(p, "tcgraph")) for p in paths)
    assert not any(p.endswith("lib-dynload") for p in paths)
