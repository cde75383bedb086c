"""Torch programs of an artifact folder, ready to run: a loader, called when a runner activates.

`ProgramsFromArtifact(artifact, device=..., precision=...)()` reads every variant's
ATen graph (`variants/<id>.program.safetensors`, written at transform time by
`tcgraph.export.programs.write_programs`; nothing in it is unpickled or evaluated), maps the model's tensors in from the shared
`variants/weights.bin` through the artifact's parameter map, ONCE for all variants (cast
to the precision and moved to the device once), and lowers each graph to the precision.
Nothing is rebuilt and no pass runs: the folder alone is enough.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.export.programs import Program, read_program
from tcgraph.export.weights import load_parameters
from tcgraph.runtime.torch.precision import lower_precision, precision_dtype

REDO = "re-run `tcgraph transform` with this tcgraph to write a folder the torch backend can read, or use --backend ort"


class TorchProgram:
    """One variant as a callable: `program(*inputs)` -> tuple of outputs, in the variant's I/O order.

    `gm` is the exported (lifted) graph; it takes the tensors it reads (`weights`, by
    name: the shared model tensors and the graph's own ones) before the variant inputs.
    """

    def __init__(self, vid: str, gm: torch.fx.GraphModule, weights: dict[str, torch.Tensor], lifted: list[str]):
        self.id = vid
        self.gm = gm
        self.weights = weights
        self._lifted = [weights[name] for name in lifted]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = self.gm(*self._lifted, *inputs)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def load_weights(artifact: Artifact, names: Iterable[str] | None = None, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's tensors from the artifact's weights file (floating ones in `dtype`, on `device`)."""
    parameters = artifact.parameters
    if not parameters:
        raise TcgraphError(
            f"{artifact.root} does not map the model's parameters (manifest.json has no 'parameters'; it was "
            f"written by an older tcgraph or not by `tcgraph transform`), so the torch backend cannot read its "
            f"weights; {REDO}"
        )
    entries = {p.name: p.to_entry() for p in parameters}
    if names is not None:
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in entries]
        if missing:
            raise TcgraphError(f"the torch programs of {artifact.root} read tensors the parameter map lacks "
                               f"({missing[:5]}); the folder is inconsistent: {REDO}")
        entries = {n: entries[n] for n in wanted}
    try:
        state = load_parameters(artifact.weights_path, entries)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, OSError) as e:
        raise TcgraphError(f"cannot read the model's tensors from {artifact.weights_path}: {e}; the folder is "
                           f"damaged; {REDO}") from e
    return {name: _place(t, device, dtype) for name, t in state.items()}


def _place(t: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device, dtype if t.is_floating_point() else t.dtype)


class ProgramsFromArtifact:
    """Loader: `loader()` -> {variant id: TorchProgram}, all variants reading one copy of the weights."""

    def __init__(self, artifact: Artifact, *, device: torch.device | str = "cpu", precision: str = "fp32"):
        self.artifact = artifact
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = precision_dtype(precision)

    def __call__(self) -> dict[str, TorchProgram]:
        art = self.artifact
        files = art.programs
        missing = [v.id for v in art.variants if v.id not in files]
        if missing:
            what = "has no torch programs" if not files else f"has no torch program for variants {missing}"
            raise TcgraphError(
                f"{art.root} {what} (manifest.json 'programs'; folders written before tcgraph saved them there "
                f"have none), so the torch backend cannot run it; {REDO}"
            )
        device = self.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        loaded = {}
        for spec in art.variants:
            vid = spec.id
            program = read_program(art.file(files[vid]), device)
            info = program.info
            if (info.get("inputs"), info.get("outputs")) != (list(spec.input_names), list(spec.output_names)):
                raise TcgraphError(
                    f"the torch program of variant {vid} has inputs/outputs {info.get('inputs')} -> "
                    f"{info.get('outputs')}, but manifest.json says {list(spec.input_names)} -> "
                    f"{list(spec.output_names)}; the folder is inconsistent: {REDO}"
                )
            loaded[vid] = program
        shared = load_weights(art, [n for p in loaded.values() for n in p.info.get("weights", [])],
                              device=device, dtype=self.dtype)
        return {vid: self._program(vid, p, shared) for vid, p in loaded.items()}

    def _program(self, vid: str, program: Program, shared: dict[str, torch.Tensor]) -> TorchProgram:
        mapped = set(program.info.get("weights", []))
        weights, lifted, users = {}, [], []
        for kind, name in program.inputs:
            if kind == "user":
                users.append(name)
                continue
            if name in mapped and kind in ("parameter", "buffer"):
                tensor = shared[name]
            elif name in program.tensors:
                own = program.tensors[name]
                tensor = own.to(self.device) if kind == "constant" else _place(own, self.device, self.dtype)
            else:
                raise TcgraphError(f"the torch program of variant {vid} reads the tensor {name}, which neither its "
                                   f"file nor the parameter map holds; the folder is inconsistent: {REDO}")
            weights[name] = tensor.detach()
            lifted.append(name)
        if users != list(program.info.get("inputs", [])):
            raise TcgraphError(f"the torch program of variant {vid} takes the inputs {users}, but says "
                               f"{program.info.get('inputs')}; the folder is inconsistent: {REDO}")
        gm = lower_precision(program.gm, self.dtype)
        return TorchProgram(vid, gm.eval(), weights, lifted)
