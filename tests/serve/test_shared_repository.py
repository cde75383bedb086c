"""A Triton repository is shared: `export-triton --force` replaces only tcgraph's own model folder,
verified against its marker (never another model, never a folder holding a copied marker or
changed since), refuses a repository inside the artifact, and refuses what the model could never
serve (trt without engines) at export and serve time. No server needed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tcgraph.cli import main
from tcgraph.serve.marker import MARKER
from tcgraph.serve.repository import check_repository, write_repository

MODEL = "digits-fora2"


def tree(path: Path) -> dict[str, str]:
    """Every entry below `path`: files by sha256, links by target, folders as such."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = (f"link:{os.readlink(p)}" if p.is_symlink() else
                    hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


def other_model(repo: Path, name: str = "resnet") -> Path:
    """A model folder another tool wrote into the same repository (with a link, as some do)."""
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n')
    (folder / "1" / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (folder / "labels.txt").write_text("cat\ndog\n")
    os.symlink("1", folder / "latest")
    return folder


def export(art, repo, *extra) -> tuple[int, str]:
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["export-triton", str(art), str(repo), *map(str, extra)])
    return code, err.getvalue()


def test_another_model_survives_export_and_force_byte_for_byte(serve_artifact, tmp_path):
    repo = tmp_path / "models"
    other_model(repo)
    (repo / "README").write_text("the team's models\n")
    before = tree(repo)
    assert export(serve_artifact, repo)[0] == 0  # added beside it; no --force needed for a new model folder
    first = tree(repo / MODEL)
    assert export(serve_artifact, repo, "--force", "--instances", "2")[0] == 0
    after = tree(repo)
    assert {k: v for k, v in after.items() if not k.startswith(MODEL)} == before  # byte for byte, link included
    assert sorted(os.listdir(repo)) == sorted(["README", "resnet", MODEL])  # no temporary in it
    assert os.listdir(tmp_path) == ["models"]  # nor beside it
    assert "count: 2" in (repo / MODEL / "config.pbtxt").read_text()
    assert first.keys() == tree(repo / MODEL).keys()
    assert check_repository(repo)["model"] == MODEL
    # --force naming the other model is refused, and it stays as it was
    code, err = export(serve_artifact, repo, "--force", "--name", "resnet")
    assert code == 2 and "resnet is not a model folder that tcgraph wrote and nobody changed (it has no " \
                          "tcgraph-model.json: tcgraph did not write it)" in err and "Traceback" not in err
    assert {k: v for k, v in tree(repo).items() if not k.startswith(MODEL)} == before


@pytest.mark.parametrize("edit, why", [
    ("copied marker only", "its tcgraph-model.json is for model 'digits-fora2', not 'victim': it was copied from"),
    ("copied marker, name edited", "1/artifact/manifest.json is missing"),
    ("marker copied into a model", "1/model.onnx was not written by tcgraph"),
    ("file added", "notes.txt was not written by tcgraph"),
    ("config edited", "config.pbtxt changed since tcgraph wrote it (sha256 differs)"),
    ("weights edited", "1/artifact/variants/weights.bin changed since tcgraph wrote it"),
    ("file removed", "1/model.py is missing"),
    ("link inside", "1/artifact/extra is a link or a special file"),
    ("marker garbage", "it has no tcgraph-model.json"),
    ("marker lists outside", "its tcgraph-model.json is damaged"),
])
def test_force_never_deletes_a_folder_that_does_not_match_its_marker(serve_artifact, tmp_path, edit, why):
    repo = write_repository(serve_artifact, tmp_path / "r")
    ours = repo / MODEL
    marker = json.loads((ours / MARKER).read_text())
    name = MODEL
    if edit.startswith("copied marker"):
        name = "victim"
        (repo / name).mkdir()
        if edit == "copied marker, name edited":
            marker["model"] = name
        (repo / name / MARKER).write_text(json.dumps(marker))
    elif edit == "marker copied into a model":
        name = "resnet"
        other_model(repo)
        os.unlink(repo / name / "latest")
        marker["model"] = name
        (repo / name / MARKER).write_text(json.dumps(marker))
    elif edit == "file added":
        (ours / "notes.txt").write_text("mine")
    elif edit == "config edited":
        (ours / "config.pbtxt").write_text((ours / "config.pbtxt").read_text().replace("count: 1", "count: 4"))
    elif edit == "weights edited":
        weights = ours / "1" / "artifact" / "variants" / "weights.bin"
        data = bytearray(weights.read_bytes())
        data[7] ^= 1
        weights.write_bytes(bytes(data))
    elif edit == "file removed":
        (ours / "1" / "model.py").unlink()
    elif edit == "link inside":
        os.symlink(tmp_path, ours / "1" / "artifact" / "extra")
    elif edit == "marker garbage":
        (ours / MARKER).write_text("{not json")
    elif edit == "marker lists outside":
        marker["files"]["../../secret"] = "0" * 64
        (ours / MARKER).write_text(json.dumps(marker))
    before = tree(repo)
    code, err = export(serve_artifact, repo, "--force", "--name", name)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{name} is not a model folder that tcgraph wrote and nobody changed ({why}" in err, err
    assert "--force replaces only such a folder, checked against its tcgraph-model.json" in err
    assert tree(repo) == before and sorted(os.listdir(tmp_path)) == ["r"]


@pytest.mark.parametrize("where", ["ART/repo", "ART", "ART/variants/deep/repo", "link into ART", "link to ART"])
def test_a_repository_inside_the_artifact_is_refused(serve_artifact, tmp_path, where):
    art = tmp_path / "art"
    shutil.copytree(serve_artifact, art)
    repo = {"ART/repo": art / "repo", "ART": art, "ART/variants/deep/repo": art / "variants" / "deep" / "repo",
            "link into ART": tmp_path / "lnk" / "repo", "link to ART": tmp_path / "lnk"}[where]
    os.symlink(art / "variants" if where == "link into ART" else art, tmp_path / "lnk")
    before = tree(art)
    code, err = export(art, repo)
    assert code == 2 and "Traceback" not in err
    assert f"{repo} is inside the artifact {art} (links resolved); a repository there would change the artifact" in err
    assert tree(art) == before


def test_the_artifact_inside_the_model_folder_to_replace_is_refused(serve_artifact, tmp_path):
    repo = write_repository(serve_artifact, tmp_path / "r")
    inner = repo / MODEL / "1" / "artifact"
    before = tree(repo)
    code, err = export(inner, repo, "--force", "--name", MODEL)
    assert code == 2 and f"the artifact {inner} is inside the model folder {repo / MODEL} that --force would " \
                          "replace" in err
    assert tree(repo) == before
    assert export(inner, repo, "--name", "copy")[0] == 0  # another name is fine: nothing is replaced
    check_repository(repo, "copy")


def test_serve_trt_without_tensorrt_is_refused_at_once(serve_artifact, capsys):
    start = time.monotonic()
    assert main(["serve", str(serve_artifact), "--backend", "trt"]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - start < 10 and err.count("\n") == 1, err
    assert err.startswith(f"tcgraph: error: {serve_artifact} has no TensorRT engines (manifest.json has no "
                          "'tensorrt' section), so a trt model could never load")


def test_serve_trt_checks_tensorrt_before_the_server(serve_artifact, monkeypatch):
    """With engines in the manifest, TensorRT itself (or a GPU) missing is said before any server starts."""
    from tcgraph.errors import TcgraphError
    from tcgraph.serve import launch

    started = []
    monkeypatch.setattr(launch, "TritonServer", lambda *a, **k: started.append(1))
    monkeypatch.setattr(launch, "check_servable", lambda *a, **k: None)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    with pytest.raises(TcgraphError, match="the TensorRT backend needs the `tensorrt` Python package"):
        launch.serve(serve_artifact, backend="trt", port=1)
    assert not started


def test_a_writer_killed_between_two_renames_is_undone_and_the_fallback_swaps(serve_artifact, tmp_path, monkeypatch):
    from tcgraph.serve import placement

    repo = write_repository(serve_artifact, tmp_path / "r")
    other_model(repo)
    before = tree(repo)
    # killed with the old model folder in its temporary (pid 4000000 is above pid_max: never running)
    stale = tmp_path / ".r.tmp-4000000-0123abcd"
    (stale / "old").mkdir(parents=True)
    (repo / MODEL).rename(stale / "old" / MODEL)
    (repo / ".second.tmp-4000000-89abcdef").mkdir()  # and a half-built "second" inside REPO
    monkeypatch.setattr(placement, "rename_with_flags", lambda *a: False)  # no renameat2: the two-rename swap
    assert export(serve_artifact, repo, "--name", "second")[0] == 0
    assert {k: v for k, v in tree(repo).items() if not k.startswith("second")} == before  # put back as it was
    assert export(serve_artifact, repo, "--force", "--instances", "3")[0] == 0
    assert "count: 3" in (repo / MODEL / "config.pbtxt").read_text()
    assert {k: v for k, v in tree(repo).items() if k.startswith("resnet")} == \
        {k: v for k, v in before.items() if k.startswith("resnet")}
    assert sorted(os.listdir(repo)) == sorted([MODEL, "resnet", "second"]) and os.listdir(tmp_path) == ["r"]
