"""The `config.pbtxt` of a tcgraph model (Triton's model configuration, protobuf text format).

Triton batches along the first dimension of every input: one row per image. The dynamic
batcher gathers requests until it has the artifact's image batch (`preferred_batch_size`,
also `max_batch_size`: the most images one batch, and so one request, may hold) or the
queue delay has passed; the model then samples them in runs of that static batch, padding
a short run and dropping the padding (tcgraph/serve/sampler.py). Note that the artifact's
*model* batch is twice that with guidance (both halves run in one graph): Triton counts
images. One instance group puts `instances` model instances on the CPU, or on each GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tcgraph.errors import UsageError
from tcgraph.serve.requests import CLASSES, IMAGES, SEED


@dataclass(frozen=True)
class Input:
    """One input of the Triton model: its name, Triton data type and dims past the batch dimension."""

    name: str
    dtype: str  # TYPE_INT64, TYPE_FP32
    dims: tuple[int, ...]


CLASS_INPUTS = (Input(CLASSES, "TYPE_INT64", (1,)), Input(SEED, "TYPE_INT64", (1,)))

NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DEFAULT_QUEUE_DELAY_US = 2000  # long enough for concurrent clients to fill a batch, short next to a sampling run


@dataclass(frozen=True)
class ModelConfig:
    name: str
    batch: int  # images per run of the artifact (not counting the guidance halves)
    image_shape: tuple[int, int, int]  # H, W, C of the uint8 output
    instances: int = 1
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    dynamic_batching: bool = True
    backend: str = "ort"
    device: str = ""  # "" = the backend's default; "cuda" puts the instances on the GPUs (KIND_GPU)
    inputs: tuple[Input, ...] = CLASS_INPUTS  # a text-conditioned model's: tcgraph/serve/text_requests.py

    @property
    def kind(self) -> str:
        return "KIND_GPU" if self.device == "cuda" or self.backend == "trt" else "KIND_CPU"

    def text(self) -> str:
        h, w, c = self.image_shape
        lines = [
            f'name: "{self.name}"',
            'backend: "python"',
            f"max_batch_size: {self.batch}",
            "input [",
            ",\n".join(f'  {{ name: "{i.name}" data_type: {i.dtype} dims: [ {", ".join(map(str, i.dims))} ] }}'
                       for i in self.inputs),
            "]",
            "output [",
            f'  {{ name: "{IMAGES}" data_type: TYPE_UINT8 dims: [ {h}, {w}, {c} ] }}',
            "]",
        ]
        if self.dynamic_batching:
            lines += [
                "dynamic_batching {",
                f"  preferred_batch_size: [ {self.batch} ]",
                f"  max_queue_delay_microseconds: {self.max_queue_delay_us}",
                "}",
            ]
        lines += [
            f"instance_group [ {{ count: {self.instances} kind: {self.kind} }} ]",
            f'parameters: {{ key: "backend" value: {{ string_value: "{self.backend}" }} }}',
            f'parameters: {{ key: "device" value: {{ string_value: "{self.device}" }} }}',
        ]
        return "\n".join(lines) + "\n"


def check_name(name: str) -> str:
    """A Triton model name that is also a safe folder name."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"model name (--name) {name!r} is not usable: use letters, digits, '_', '.' and '-' "
                         "(at most 128, not starting with '.' or '-')")
    return name


def default_name(artifact_folder: str) -> str:
    """The artifact folder's name, made into a model name (`digits-fora2`)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", artifact_folder).lstrip(".-") or "tcgraph"
    return name[:128]
