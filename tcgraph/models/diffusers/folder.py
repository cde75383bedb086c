"""diffusers folders (what `save_pretrained` writes), read without importing diffusers: which class a
folder holds, its weight files and its JSON, every path a file names checked to stay inside it.

A folder's files are not trusted: no path a file names (a weights index's shards, model_index.json's
components, a tokenizer's files) may leave its folder (`inside`: no `..`, no absolute path, no symlink
out, except into the Hugging Face cache's blobs).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.models.diffusers.config import show_value, state_dict_shapes
from tcgraph.models.families import diffusers_classes, family_of_diffusers_class
from tcgraph.models.config import DiTConfig

# diffusers model classes tcgraph transforms -> the tcgraph module that wraps them
WEIGHTS_NAME = "diffusion_pytorch_model"


@dataclass(frozen=True)
class DiffusersFolder:
    """A diffusers model folder, found from a model or a pipeline folder."""

    model_dir: Path  # holds config.json and the weights
    config: dict  # config.json
    pipeline_dir: Path | None  # the pipeline folder (model_index.json), when given one

    @property
    def class_name(self) -> str:
        return self.config["_class_name"]


def diffusers_missing(e: ImportError) -> TcgraphError:
    """The one error of a diffusers family's module when the optional diffusers package is missing."""
    return TcgraphError(f"diffusers models need the diffusers package ({e}); install it with `pip install diffusers` "
                        "or `pip install 'tcgraph[diffusers]'`")


def is_diffusers_folder(path: Path) -> bool:
    """Whether `path` looks like a diffusers model or pipeline folder (it need not be a valid one)."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "model_index.json").is_file())


def inside(folder: Path, entry, source: Path, what: str) -> Path:
    """`folder / entry`, for the path `entry` that the file `source` names as `what`, refused unless it
    stays inside `folder`: a relative path without `..` that, symlinks resolved, still lies below `folder`
    (or is a blob of the Hugging Face cache that holds `folder`: every file of a cached snapshot is a
    symlink to one). One TcgraphError names the file, the entry and why."""
    why = None
    if not isinstance(entry, str) or not entry.strip() or "\x00" in entry:
        why = "is not a file name"
    elif Path(entry).is_absolute() or Path(entry).anchor:
        why = "is an absolute path"
    elif ".." in Path(entry).parts:
        why = "climbs out of the folder with '..'"
    else:
        real, root = (folder / entry).resolve(), folder.resolve()
        if real != root and root not in real.parents and not _hub_blob(root, real):
            why = f"is a symlink to {real}, outside the folder"
    if why:
        raise TcgraphError(f"{source}: {what} {show_value(entry)} {why}; a path read from a file must stay inside "
                           f"{folder}, so tcgraph reads nothing else: the folder is damaged or was made to read "
                           "other files; save the model again with save_pretrained")
    return folder / entry


def _hub_blob(root: Path, real: Path) -> bool:
    """Whether `real` is a file of `<repo>/blobs/` for a `root` below `<repo>/snapshots/<revision>/`."""
    snapshot = next((a for a in (root, *root.parents) if a.parent.name == "snapshots"), None)
    return snapshot is not None and real.parent == snapshot.parent.parent / "blobs"


def check_pipeline_index(pipeline: Path, index: dict) -> None:
    """A pipeline's model_index.json names its components, each a subfolder (diffusers' loader reads
    `pipeline/<name>/`): every name must be a plain folder name, and tcgraph's components must stay inside."""
    where = pipeline / "model_index.json"
    for name, entry in index.items():
        if name.startswith("_"):
            continue  # _class_name, _diffusers_version, _name_or_path: metadata, no folder
        if not name or Path(name).name != name or name in (".", ".."):
            inside(pipeline, name, where, "the component")  # names why: absolute, '..' or not a name
            raise TcgraphError(f"{where}: the component {show_value(name)} is not a plain folder name; a component's "
                               "folder lies directly in the pipeline folder: save the pipeline again")
        if not (entry is None or isinstance(entry, list) and len(entry) == 2):
            raise TcgraphError(f"{where}: the component {name!r} is {show_value(entry)}, expected [library, class]; "
                               "save the pipeline again with save_pretrained")
    for name in ("transformer", "scheduler", "text_encoder", "tokenizer"):
        if (pipeline / name).exists():
            inside(pipeline, name, where, "the component")


def read_folder(path: str | Path) -> DiffusersFolder:
    """The model folder of `path`: a model folder (`config.json` + weights), or a pipeline folder
    (`model_index.json`, whose `transformer/` holds the model). Refuses an unsupported class by name,
    and a pipeline whose model_index.json names folders outside it (`check_pipeline_index`)."""
    path = Path(path)
    pipeline = None
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json", "the pipeline index")
        check_pipeline_index(path, index)
        pipeline, path = path, path / "transformer"
        if not (path / "config.json").is_file():
            raise TcgraphError(
                f"{pipeline} is a diffusers pipeline folder (it has model_index.json, a "
                f"{index.get('_class_name', 'pipeline')}) but has no transformer/config.json; tcgraph transforms "
                "the pipeline's transformer: pass a pipeline whose transformer/ folder holds config.json and its weights")
    elif not (path / "config.json").is_file():
        raise TcgraphError(f"{path} is not a diffusers folder: it has neither config.json (a model folder) nor "
                           "model_index.json (a pipeline folder); pass what diffusers' save_pretrained wrote")
    config = read_json(path / "config.json", "the model config")
    name = config.get("_class_name")
    if not isinstance(name, str):
        raise TcgraphError(f"{path / 'config.json'} has no _class_name; it is not a diffusers model config "
                           "(save_pretrained writes one)")
    if family_of_diffusers_class(name) is None:  # the families registry says which classes tcgraph takes
        raise TcgraphError(f"{path}: tcgraph does not transform diffusers' {name}; supported classes: "
                           f"{', '.join(diffusers_classes())}")
    return DiffusersFolder(path, config, pipeline)


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a model folder: one safetensors file, or the shards its index names."""
    single = model_dir / f"{WEIGHTS_NAME}.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / f"{WEIGHTS_NAME}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise TcgraphError(f"{index} has no weight_map; it is damaged: save the model again")
        files = list(dict.fromkeys(inside(model_dir, f, index, f"the weight_map entry of {show_value(k)}")
                                   for k, f in weight_map.items()))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise TcgraphError(f"{model_dir}: the weights index names shards that are missing: {', '.join(missing[:3])}")
        return files
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return found
    others = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = (f"; it has {', '.join(others)}: tcgraph reads diffusers weights from safetensors only, so save them "
            "with safe_serialization=True" if others else "")
    what = f"{len(found)} safetensors files and no index" if found else "no safetensors weights"
    raise TcgraphError(f"{model_dir} has {what} ({WEIGHTS_NAME}.safetensors expected){hint}")


def load_weights_into(folder: DiffusersFolder, model_cls: type, class_name: str, config: DiTConfig,
                      want: dict[str, tuple[int, ...]] | None = None):
    """A `model_cls` (a diffusers model class) built from `folder`'s config.json with its safetensors
    weights, in float32; refuses damaged files, and weights that do not fit `config` (what config.json
    says, read by the caller) before the model is built. The caller checks the weights' values after
    (`tcgraph.models.official.checkpoint.check_finite`). `want`: {name: shape} of the weights the folder
    must hold, where they are not the family's state dict (a wrapper that renames or splits some)."""
    from safetensors.torch import load_file  # only with diffusers installed, as its callers are

    where = folder.model_dir / "config.json"
    state: dict = {}
    for path in weight_files(folder.model_dir):
        try:
            state.update(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise TcgraphError(f"cannot read the weights {path}: {type(e).__name__}: {e}; the file is damaged or "
                               "not safetensors: save the model again") from None
    if want is None:
        want = {k: v for k, v in state_dict_shapes(config).items() if k != "pos_table"}  # pos_table: not saved
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} {list(state[k].shape)} vs {list(want[k])}" for k in want
              if k in state and tuple(state[k].shape) != want[k]]
    if missing or extra or shapes:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {', '.join(extra[:3])})" if extra else "",
                 f"{len(shapes)} with other shapes (e.g. {', '.join(shapes[:2])})" if shapes else ""]
        raise TcgraphError(f"the weights in {folder.model_dir} do not fit its config.json: "
                           f"{'; '.join(p for p in parts if p)}; save the model again with save_pretrained")
    try:  # the sizes fit the weights (checked above), so building allocates no more than they hold
        model = model_cls.from_config(folder.config)
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except Exception as e:  # diffusers validates its own config
        raise TcgraphError(f"diffusers cannot build a {class_name} from {where} with its weights: "
                           f"{type(e).__name__}: {str(e)[:300]}") from None
    return model.float()


def read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; one TcgraphError naming `what` for anything else."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TcgraphError(f"cannot read {what} {path}: {e}; save the model again with diffusers' save_pretrained") from None
    if not isinstance(value, dict):
        raise TcgraphError(f"{path}: {what} must be a JSON object, got a {type(value).__name__}; save the model "
                           "again with diffusers' save_pretrained")
    return value
