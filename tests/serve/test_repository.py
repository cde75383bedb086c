"""`tcgraph export-triton`: the model folder's layout and config, the hash-checked copy, one clear
error for each bad input, and never a half-written model folder. No server needed (the server
tests are in test_triton.py; other models of a shared repository: test_shared_repository.py)."""
from __future__ import annotations

import errno
import hashlib
import os
import sys
from pathlib import Path

import pytest

from tcgraph.cli import main
from tcgraph.errors import TcgraphError
from tcgraph.serve import repository
from tcgraph.serve.marker import MARKER
from tcgraph.serve.repository import TEMPLATE, check_model, check_repository, write_repository
from tcgraph.serve.triton import STUB_PATH, find_triton, package_paths, python_folder, stub_environment


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
        == ["digits-fora2/1/model.py", "digits-fora2/config.pbtxt", f"digits-fora2/{MARKER}"]
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
    # the marker lists every other file of the model folder with its sha256
    assert sorted(marker["files"]) == sorted(p.relative_to(model).as_posix() for p in model.rglob("*")
                                             if p.is_file() and p.name != MARKER)
    assert marker["files"]["config.pbtxt"] == hashlib.sha256((model / "config.pbtxt").read_bytes()).hexdigest()
    assert siblings(repo) == ["models"] and os.listdir(repo) == ["digits-fora2"]  # no temporary left anywhere


def test_options_change_the_config(serve_artifact, tmp_path):
    repo = write_repository(serve_artifact, tmp_path / "r", name="dit_1", dynamic_batching=False, backend="torch")
    config = (repo / "dit_1" / "config.pbtxt").read_text()
    assert "dynamic_batching" not in config and 'string_value: "torch"' in config and 'name: "dit_1"' in config


@pytest.mark.parametrize("argv, message, code", [
    (["{tmp}/missing", "{tmp}/r"], "missing is not a tcgraph artifact folder", 1),
    (["{art}", "{tmp}/plain", "--name", "mine"], "plain/mine already exists and is not a model folder tcgraph wrote; "
                                                 "tcgraph never replaces another model: choose another --name", 1),
    (["{art}", "{tmp}/plain", "--name", "mine", "--force"],
     "plain/mine is not a model folder that tcgraph wrote and nobody changed (it has no tcgraph-model.json: tcgraph "
     "did not write it); --force replaces only such a folder", 2),
    (["{art}", "{tmp}/file.txt", "--force"], "file.txt is a file, not a folder; REPO is a Triton model repository", 1),
    (["{art}", "{tmp}/r", "--instances", "0"], "instances (--instances) must be an integer in 1..1024, got 0", 2),
    (["{art}", "{tmp}/r", "--max-queue-delay-us", "-1"], "max_queue_delay_us (--max-queue-delay-us) must be", 2),
    (["{art}", "{tmp}/r", "--name", "../up"], "model name (--name) '../up' is not usable", 2),
    (["{art}", "{tmp}/file.txt/r"], "file.txt is a file, not a folder", 1),
    (["{art}", "{tmp}/r", "--backend", "trt"], "has no TensorRT engines (manifest.json has no 'tensorrt' section), "
                                               "so a trt model could never load", 1),
    (["{art}", "{tmp}/r", "--backend", "trt", "--device", "cpu"], "--backend trt runs only on NVIDIA GPUs", 2),
])
def test_bad_input_gets_one_clear_error_and_nothing_is_touched(serve_artifact, tmp_path, capsys, argv, message, code):
    (tmp_path / "plain" / "mine").mkdir(parents=True)
    (tmp_path / "plain" / "mine.txt").write_text("not tcgraph's")
    (tmp_path / "file.txt").write_text("a file")
    before = siblings(tmp_path / "x")
    assert main(["export-triton", *[a.format(art=serve_artifact, tmp=tmp_path) for a in argv]]) == code
    err = capsys.readouterr().err
    assert err.startswith("tcgraph: error: ") and message in err and "Traceback" not in err
    assert siblings(tmp_path / "x") == before and sorted(os.listdir(tmp_path / "plain")) == ["mine", "mine.txt"]
    assert (tmp_path / "plain" / "mine.txt").read_text() == "not tcgraph's"
    assert (tmp_path / "file.txt").read_text() == "a file"


def test_force_replaces_a_model_folder_tcgraph_wrote(serve_artifact, tmp_path, capsys):
    repo = write_repository(serve_artifact, tmp_path / "r")
    assert main(["export-triton", str(serve_artifact), str(repo)]) == 1
    assert ("r/digits-fora2 already exists (model 'digits-fora2', written by tcgraph); pass --force to replace it"
            in capsys.readouterr().err)
    assert main(["export-triton", str(serve_artifact), str(repo), "--force", "--instances", "3"]) == 0
    assert "count: 3" in (repo / "digits-fora2" / "config.pbtxt").read_text()
    check_repository(repo)
    assert siblings(repo) == ["r"] and os.listdir(repo) == ["digits-fora2"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_export_leaves_nothing_behind(serve_artifact, tmp_path, monkeypatch, failure):
    old = write_repository(serve_artifact, tmp_path / "old")
    marker = (old / "digits-fora2" / MARKER).read_text()

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
    assert (old / "digits-fora2" / MARKER).read_text() == marker and os.listdir(old) == ["digits-fora2"]
    check_repository(old)


def test_check_repository_names_the_damaged_file(serve_artifact, tmp_path):
    repo = write_repository(serve_artifact, tmp_path / "r")
    model_py = repo / "digits-fora2" / "1" / "model.py"
    model_py.write_text(model_py.read_text() + "\n# edited\n")
    with pytest.raises(TcgraphError, match="digits-fora2 is damaged: 1/model.py changed since tcgraph wrote it"):
        check_repository(repo)
    repo = write_repository(serve_artifact, tmp_path / "r2")
    weights = repo / "digits-fora2" / "1" / "artifact" / "variants" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(TcgraphError, match="weights.bin"):
        check_repository(repo)
    with pytest.raises(TcgraphError, match="holds no model folder tcgraph wrote"):
        check_repository(serve_artifact)
    with pytest.raises(TcgraphError, match="is not a model folder tcgraph wrote .it has no tcgraph-model.json"):
        check_model(serve_artifact)


def test_serve_without_the_extra_says_how_to_install_it(serve_artifact, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytriton", None)  # `import pytriton` raises ImportError
    with pytest.raises(TcgraphError, match=r"install the serve extra: pip install 'tcgraph\[serve\]'"):
        find_triton()
    assert main(["serve", str(serve_artifact)]) == 1
    err = capsys.readouterr().err
    assert err == ("tcgraph: error: Triton Inference Server is not installed; install the serve extra: "
                   "pip install 'tcgraph[serve]' (nvidia-pytriton, tritonclient)\n")


def test_the_stub_imports_this_tcgraph(serve_artifact, tmp_path):
    import tcgraph

    paths = package_paths()
    assert str(tcgraph.__path__[0]).rsplit("/", 1)[0] in paths or any(
        os.path.isdir(os.path.join(p, "tcgraph")) for p in paths)
    assert not any(p.endswith("lib-dynload") for p in paths)
    # the isolated stub finds its prefix from the first python3 on PATH: this interpreter's, even with no PATH
    env = stub_environment(find_triton(), base={}, workdir=tmp_path)
    first = Path(env["PATH"].split(os.pathsep)[0])
    assert os.path.realpath(first / "python3") == os.path.realpath(sys.executable)
    assert env["PATH"].split(os.pathsep)[1:] == os.defpath.strip(os.pathsep).split(os.pathsep)  # bash is still found
    assert env[STUB_PATH].split(os.pathsep) == paths
    assert python_folder(tmp_path) == first
