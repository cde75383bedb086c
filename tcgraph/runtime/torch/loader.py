"""Torch programs of an artifact folder, ready to run: a loader, called when a runner activates.

`ProgramsFromArtifact(artifact, device=..., precision=...)()` reads every variant's
`torch.export` program (`variants/<id>.pt2`, written at transform time by
`tcgraph.export.programs.write_programs`), maps the model's tensors in from the shared
`variants/weights.bin` through the artifact's parameter map, ONCE for all variants (cast
to the precision and moved to the device once), and lowers each graph to the precision.
Nothing is rebuilt and no pass runs: the folder alone is enough.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.export.graph_signature import InputKind, OutputKind

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.export.programs import read_program
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
            ep, info = read_program(art.file(files[vid]))
            if (info.get("inputs"), info.get("outputs")) != (list(spec.input_names), list(spec.output_names)):
                raise TcgraphError(
                    f"the torch program of variant {vid} has inputs/outputs {info.get('inputs')} -> "
                    f"{info.get('outputs')}, but manifest.json says {list(spec.input_names)} -> "
                    f"{list(spec.output_names)}; the folder is inconsistent: {REDO}"
                )
            if device.type != "cpu":  # devices the export traced with (arange(device=cpu), ...) move too
                from torch.export.passes import move_to_device_pass

                ep = move_to_device_pass(ep, {"cpu": str(device)})
            loaded[vid] = (ep, info)
        shared = load_weights(art, [n for _, info in loaded.values() for n in info.get("weights", [])],
                              device=device, dtype=self.dtype)
        return {vid: self._program(vid, ep, info, shared) for vid, (ep, info) in loaded.items()}

    def _program(self, vid: str, ep, info: dict, shared: dict[str, torch.Tensor]) -> TorchProgram:
        mapped = set(info.get("weights", []))
        weights, lifted = {}, []
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                continue
            name = spec.target
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                tensor = shared[name] if name in mapped else _place(ep.state_dict[name], self.device, self.dtype)
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                tensor = ep.constants[name].to(self.device)
            else:
                raise TcgraphError(f"the torch program of variant {vid} takes a {spec.kind.name} input "
                                   f"({name}), which tcgraph programs never have; {REDO}")
            weights[name] = tensor.detach()
            lifted.append(name)
        if any(spec.kind != OutputKind.USER_OUTPUT for spec in ep.graph_signature.output_specs):
            raise TcgraphError(f"the torch program of variant {vid} mutates its inputs or buffers; {REDO}")
        gm = lower_precision(ep.graph_module, self.dtype)
        return TorchProgram(vid, gm.eval(), weights, lifted)
