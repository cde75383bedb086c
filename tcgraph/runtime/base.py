"""The one small interface every backend implements (polygraphy-style runners).

A runner loads the variants of an artifact folder (`activate`), runs one variant with
named tensors (`run`), and releases everything (`deactivate`). The base class does the
checks every backend needs (variant id, input names, shapes, dtypes) so that a wrong
feed fails with the same clear message on every backend; subclasses fill in
`_activate_impl`, `_run_impl`, `_to_torch_impl` (and `_deactivate_impl`).

What a runner runs comes from a loader, Polygraphy's way: a cheap callable made with the
runner and called in `activate` (`SessionsFromArtifact`, `ProgramsFromArtifact`,
`EnginesFromArtifact`), or handed to it ready (`sessions=`, `programs=`, `engines=`), so a
test can run a runner on stand-ins without faking a whole library.

Values returned by `run` are backend values (an `OrtValue`, a device buffer, ...): feed
them back into the next `run` as they are, so caches stay in backend memory between
denoising steps, and call `to_torch` only on what the caller needs on the host.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.export.specs import TensorSpec, VariantSpec


class Runner(ABC):
    """Run the variants of one artifact folder on one backend."""

    name: str = "base"

    def __init__(self, artifact: Artifact, **options: Any):
        if options:
            valid = [
                p.name for p in inspect.signature(type(self).__init__).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
            ]
            raise TcgraphError(
                f"runner {self.name!r} got unknown options {sorted(options)}; "
                + (f"valid options: {', '.join(valid)}" if valid else "it takes no options")
            )
        self.artifact = artifact
        self.is_active = False
        self.specs: dict[str, VariantSpec] = {v.id: v for v in artifact.variants}  # in export order
        self._inputs: dict[str, dict[str, TensorSpec]] = {
            vid: {i.name: i for i in spec.inputs} for vid, spec in self.specs.items()}

    # ---------------------------------------------------------------- lifecycle

    def activate(self) -> None:
        """Load every variant (sessions, engines, ...); a second call does nothing."""
        if not self.is_active:
            self._activate_impl()
            self.is_active = True

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"<{type(self).__name__} {self.name!r} {self.artifact.root} ({state})>"

    # ---------------------------------------------------------------- running

    @property
    def device(self) -> torch.device:
        """Where this runner keeps the tensors `tensor()` returns (the host unless a GPU runner)."""
        return torch.device("cpu")

    @property
    def returns_buffers(self) -> bool:
        """Whether `run` returns the runner's own fixed buffers, which its next run overwrites
        (CUDA graphs, TensorRT); the dispatcher then copies history it must keep longer."""
        return False

    def variant_ids(self) -> list[str]:
        return list(self._inputs)

    def io_names(self) -> dict[str, tuple[list[str], list[str]]]:
        """variant id -> (input names, output names), as `run` takes and returns them."""
        return {vid: (list(s.input_names), list(s.output_names)) for vid, s in self.specs.items()}

    def run(self, variant_id: str, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run one variant; returns backend values by output name (manifest `name`)."""
        if not self.is_active:
            raise TcgraphError(
                f"runner {self.name!r} is not active; call activate() first or use it as `with runner: ...`"
            )
        self._check_feeds(variant_id, feeds)
        return self._run_impl(variant_id, feeds)

    def to_torch(self, value: Any) -> torch.Tensor:
        """A backend value (or a torch/numpy value) as a CPU torch tensor, zero copy where possible."""
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)
        return self._to_torch_impl(value)

    def tensor(self, value: Any) -> torch.Tensor:
        """A backend value as a torch tensor where the backend keeps it (GPU memory for GPU
        runners): what the sampler computes with between steps, so that nothing crosses to
        the host inside the sampling loop. Host backends give `to_torch`."""
        if isinstance(value, torch.Tensor):
            return value
        return self.to_torch(value)

    # ---------------------------------------------------------------- checks

    def _check_feeds(self, variant_id: str, feeds: dict[str, Any]) -> None:
        if variant_id not in self._inputs:
            raise TcgraphError(
                f"unknown variant {variant_id!r}; this artifact has variants {', '.join(self._inputs)}"
            )
        expected = self._inputs[variant_id]
        missing = [n for n in expected if n not in feeds]
        unknown = [n for n in feeds if n not in expected]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing inputs {missing}")
            if unknown:
                parts.append(f"unknown inputs {unknown}")
            raise TcgraphError(
                f"variant {variant_id}: {' and '.join(parts)}; it takes exactly {list(expected)}"
            )
        for name, value in feeds.items():
            spec = expected[name]
            shape, dtype = self._describe(value)
            if shape is None:
                raise TcgraphError(
                    f"input {name} of variant {variant_id} is a {type(value).__name__}; pass a torch tensor, "
                    f"a numpy array, or a value returned by an earlier run of this {self.name!r} runner"
                )
            if list(shape) != list(spec.shape):
                raise TcgraphError(self._shape_message(variant_id, name, list(spec.shape), list(shape)))
            want = self._feed_dtype(name, spec.dtype)
            if dtype is not None and dtype != want:
                raise TcgraphError(
                    f"input {name} of variant {variant_id} expects dtype {want}, got {dtype}; "
                    f"convert it first (e.g. `.astype(np.{want})` or `.to(torch.{want})`)"
                )

    def _describe(self, value: Any) -> tuple[tuple[int, ...] | None, str | None]:
        """(shape, dtype name) of a feed value; (None, None) when the type is not accepted."""
        if isinstance(value, torch.Tensor):
            return tuple(value.shape), str(value.dtype).removeprefix("torch.")
        if isinstance(value, np.ndarray):
            return value.shape, str(value.dtype)
        return self._describe_impl(value)

    def _shape_message(self, vid: str, name: str, want: list[int], got: list[int]) -> str:
        msg = f"input {name} of variant {vid} expects shape {_fmt(want)}, got {_fmt(got)}"
        if len(want) == len(got) and want[1:] == got[1:] and want and want[0] != got[0]:
            return (
                f"{msg}; this artifact was built for batch {want[0]} (static shapes; the batch counts both "
                f"halves of classifier-free guidance): pass {want[0]} samples, or re-run `tcgraph transform` "
                f"with batch {got[0]}"
            )
        return (
            f"{msg}; artifacts have static shapes fixed by the plan's batch and resolution: "
            "feed the shapes listed in manifest.json, or re-run `tcgraph transform` for these shapes"
        )

    # ---------------------------------------------------------------- backend hooks

    @abstractmethod
    def _activate_impl(self) -> None: ...

    def _deactivate_impl(self) -> None:
        pass

    @abstractmethod
    def _run_impl(self, variant_id: str, feeds: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def _to_torch_impl(self, value: Any) -> torch.Tensor: ...

    def _feed_dtype(self, name: str, manifest_dtype: str) -> str:
        """The dtype this runner takes for input `name` (a bf16 runner keeps bf16 caches)."""
        return manifest_dtype

    def _describe_impl(self, value: Any) -> tuple[tuple[int, ...] | None, str | None]:
        """(shape, dtype) of a backend value; override to accept the backend's own values."""
        return None, None


def _fmt(shape) -> str:
    return "[" + ",".join(str(int(d)) for d in shape) + "]"
