"""The model's work for one Triton batch, without Triton: check each request, sample the good
ones together, and answer each with its images or a one-line error.

`model.py` (the Python-backend template) only moves tensors between Triton and this class,
so the whole behaviour, bad requests included, is tested here without a server as well as
through a real one (tests/serve/).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tcgraph.errors import TcgraphError
from tcgraph.serve.requests import BadRequest, Request
from tcgraph.serve.sampler import ServeSampler


@dataclass(frozen=True)
class Refusal:
    """The answer to a request that gets no images: `client` for a bad request (the client's to
    fix: HTTP 400, gRPC INVALID_ARGUMENT; never worth retrying as is), else a failure of the
    model while sampling (a server error)."""

    message: str
    client: bool = True


class BatchHandler:
    """One model instance's sampler (artifact loaded and hash-checked once), answering batches."""

    def __init__(self, artifact: str | Path, backend: str = "ort", device: str | None = None,
                 runner_options: dict | None = None):
        self.sampler = ServeSampler(artifact, backend, device, runner_options).__enter__()

    def close(self) -> None:
        self.sampler.__exit__(None, None, None)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The names of the model's inputs, in the order `answer` takes them: CLASSES, SEED for a
        class-conditioned model, the prompt embeddings then SEED for a text-conditioned one."""
        return tuple(i.name for i in self.sampler.inputs)

    def answer(self, inputs: Sequence[tuple[np.ndarray | None, ...]]) -> list:
        """The input arrays of each request (in the order of `input_names`) -> its uint8 images (n, H, W, C),
        or a `Refusal`."""
        answers: list = [None] * len(inputs)
        good: list[tuple[int, Request]] = []
        for i, arrays in enumerate(inputs):
            try:
                good.append((i, self.sampler.request(tuple(arrays))))
            except BadRequest as e:
                answers[i] = Refusal(str(e))
        if good:
            try:
                images = self.sampler.images([r for _, r in good])
            except (TcgraphError, RuntimeError, ValueError) as e:  # the model keeps serving the next batch
                images = [Refusal(f"sampling failed: {e}", client=False)] * len(good)
            for (i, _), img in zip(good, images):
                answers[i] = img
        return answers


def model_parameters(model_config_json: str) -> dict[str, str]:
    """The `parameters` of config.pbtxt (string values), from the JSON Triton gives `initialize`."""
    params = json.loads(model_config_json).get("parameters", {})
    return {k: v.get("string_value", "") for k, v in params.items()}
