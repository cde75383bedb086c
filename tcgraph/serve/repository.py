"""A Triton model repository for one artifact, written atomically, and its check.

    REPO/                        a Triton model repository: other models in it are kept as they are
      NAME/config.pbtxt          tcgraph/serve/config.py
      NAME/1/model.py            the Python-backend model (tcgraph/serve/model_template.py)
      NAME/1/artifact/           the artifact folder, copied; its manifest has every file's sha256,
                                 checked when the model loads and by `check_repository`
      NAME/tcgraph-model.json    the marker: sha256 of every file tcgraph wrote in NAME/ (marker.py)

The model folder is built in a hidden temporary, its copy of the artifact loaded and
hash-checked, and only then renamed into place (placement.py), so that an interrupted
export leaves no half model. Only REPO/NAME is ever written or replaced: with `force`,
and only when it is a model folder tcgraph wrote and nobody changed since.

What can be served: every artifact. A class-conditioned one reads CLASSES and SEED
(tcgraph/serve/requests.py), a text-conditioned one its prompt embeddings and SEED
(tcgraph/serve/text_requests.py). `backend="trt"` needs the artifact's TensorRT engines.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.export.artifact import Artifact, load_artifact
from tcgraph.files import atomic_write_text, remove_path, write_error
from tcgraph.progress import QUIET, Progress
from tcgraph.runtime import BACKENDS
from tcgraph.serve.config import DEFAULT_QUEUE_DELAY_US, ModelConfig, check_name, default_name
from tcgraph.serve.marker import MARKER, marker_text, own_model, read_marker
from tcgraph.serve.placement import CHOOSE, check_target, make_temporary, put_in_place
from tcgraph.serve.text_requests import serve_inputs

VERSION = "1"
ARTIFACT = "artifact"
TEMPLATE = Path(__file__).with_name("model_template.py")


def write_repository(artifact: str | Path, repo: str | Path, *, name: str | None = None, instances: int = 1,
                     max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, dynamic_batching: bool = True,
                     backend: str = "ort", device: str | None = None, force: bool = False, link: bool = False,
                     progress: Progress = QUIET, log: Callable[[str], None] = lambda line: None) -> Path:
    """Write the model folder REPO/NAME for `artifact`; returns REPO. `link` hard-links the artifact's
    files instead of copying them where the file system allows (`tcgraph serve`'s private repository)."""
    artifact, repo = Path(artifact), Path(repo)
    instances = _integer(instances, "instances", "--instances", lo=1, hi=1024)
    max_queue_delay_us = _integer(max_queue_delay_us, "max_queue_delay_us", "--max-queue-delay-us", lo=0,
                                  hi=60_000_000)
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    if device not in (None, "cpu", "cuda"):
        raise UsageError(f"device (--device) must be cpu or cuda, got {device!r}")
    name = check_name(name if name is not None else default_name(artifact.resolve().name))
    art = load_artifact(artifact)  # a missing or damaged artifact is refused before anything is written
    check_servable(art, artifact, backend, device)
    check_target(artifact, repo, name, force)
    s = art.plan.settings
    channels = 3 if art.model_config.in_channels >= 3 else 1
    config = ModelConfig(name=name, batch=s.batch, image_shape=(s.resolution, s.resolution, channels),
                         instances=instances, max_queue_delay_us=max_queue_delay_us,
                         dynamic_batching=dynamic_batching, backend=backend, device=device or "",
                         inputs=serve_inputs(art.model_config, s))
    tmp = make_temporary(repo, name)
    try:
        _fill(tmp / name, repo, artifact, config, link, progress, log)
        log("checking the copy (sha256 of every file) …")
        check_model(tmp / name)
        put_in_place(tmp, repo, name, force)
    finally:
        remove_path(tmp)  # what is left: nothing, the replaced model folder, or a failed export's files
    return repo


def check_servable(art: Artifact, path: Path, backend: str, device: str | None) -> None:
    """Refuse, at export and serve time, an artifact the Triton model could never serve."""
    if backend == "trt":
        if device == "cpu":
            raise UsageError("--backend trt runs only on NVIDIA GPUs; drop --device cpu, or use --backend ort or torch")
        if not art.tensorrt:
            raise TcgraphError(f"{path} has no TensorRT engines (manifest.json has no 'tensorrt' section), so a trt "
                               "model could never load; build them with `tcgraph transform ... --backend trt` on the "
                               "GPU kind that will serve, or export with --backend ort or torch")


def _fill(model: Path, repo: Path, artifact: Path, config: ModelConfig, link: bool, progress: Progress,
          log) -> None:
    version = model / VERSION
    files = sorted(p for p in artifact.rglob("*") if p.is_file() and not _hidden(p, artifact))
    size = sum(p.stat().st_size for p in files)
    log(f"{'linking' if link else 'copying'} {artifact} ({size / 2**20:.1f} MiB, {len(files)} files) "
        f"into model {config.name!r} version {VERSION} of {repo} …")
    try:
        with progress.phase("copy artifact", len(files)) as phase:
            for src in files:
                dst = version / ARTIFACT / src.relative_to(artifact)
                dst.parent.mkdir(parents=True, exist_ok=True)
                _copy(src, dst, link)
                phase.tick(src.name)
        shutil.copyfile(TEMPLATE, version / "model.py")
        (model / "config.pbtxt").write_text(config.text())
    except OSError as e:
        raise write_error(repo, e, CHOOSE) from None
    atomic_write_text(model / MARKER, marker_text(model, config.name, VERSION, artifact), choose=CHOOSE)


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)  # a writer's temporaries


def _copy(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copy2(src, dst)


#################################################################################
#                             Reading and checking                              #
#################################################################################


def check_model(folder: str | Path) -> dict:
    """Check a model folder tcgraph wrote: every file as its marker lists it (sha256), and the
    artifact copy (load_artifact: its manifest, every file's sha256). Returns the marker; one
    TcgraphError names the first damaged file."""
    folder = Path(folder)
    marker, problem = own_model(folder)
    if marker is None:
        raise TcgraphError(f"{folder} is not a model folder tcgraph wrote ({problem})")
    if not problem and marker.get("version") != VERSION:
        problem = f"its {MARKER} names version {marker.get('version')!r}, not {VERSION!r}"
    if problem:
        raise TcgraphError(f"the model folder {folder} is damaged: {problem}; remove it and export it again")
    load_artifact(folder / VERSION / ARTIFACT)
    return marker


def check_repository(repo: str | Path, name: str | None = None) -> dict:
    """`check_model` of REPO/NAME, or with no name of the one tcgraph model in REPO."""
    repo = Path(repo)
    if name is None:
        names = sorted(p.name for p in repo.iterdir() if read_marker(p) is not None) if repo.is_dir() else []
        if not names:
            raise TcgraphError(f"{repo} holds no model folder tcgraph wrote (no NAME/{MARKER} in it)")
        if len(names) > 1:
            raise TcgraphError(f"{repo} holds {len(names)} model folders tcgraph wrote ({', '.join(names)}); "
                               "name the one to check")
        name = names[0]
    return check_model(repo / name)


def _integer(value, name: str, option: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{name} ({option}) must be an integer in {lo}..{hi}, got {value!r}")
    return value
