"""One artifact loaded once (hashes checked), sampling the requests of each Triton batch.

It runs the same functions as `tcgraph.sample`, taken from `tcgraph.api`: the noise of a
request is `make_noise(n, …, seed)`, exactly as `sample` makes it for n labels and that
seed, and the images come from `run_batches` through the schedule dispatcher in runs of
the artifact's static batch (the last run padded, the padding dropped).

Why the results do not depend on the other requests of a batch:

- DDIM with eta = 0 (every artifact `transform` makes by default) draws no noise after the
  initial one, and every image of a run is computed on its own row (guidance halves,
  token choices and caches are per image). So the requests of a batch are packed: their
  labels and initial noise are concatenated and sampled in as few runs as possible. The
  tests check, bit for bit, that a request's images equal `tcgraph sample`'s whatever it
  was packed with.
- With eta > 0 each step draws fresh noise for a whole run from the generator of that
  run (seed + 1 + run), so an image depends on its position in the run: each request is
  then sampled in runs of its own, which is exactly what `tcgraph sample` does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tcgraph import api
from tcgraph.export.artifact import load_artifact
from tcgraph.runtime import make_runner
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.serve.requests import BadRequest, Request, check_request
from tcgraph.serve.text_requests import TextRequest, check_text_request, join, serve_inputs


class ServeSampler:
    """`with ServeSampler(path) as s: s.images([Request(...), ...])` -> one uint8 array per request."""

    def __init__(self, artifact: str | Path, backend: str = "ort", device: str | None = None,
                 runner_options: dict | None = None):
        self.artifact = load_artifact(Path(artifact))  # every file's sha256 checked
        self.settings = self.artifact.plan.settings
        self.config = self.artifact.model_config
        options = dict(runner_options or {})
        if device is not None:
            options["device"] = device
        self._runner = make_runner(backend, self.artifact, **options)
        self._dispatch = None

    # The image batch of one run; `settings.model_batch` counts the guidance halves too.
    @property
    def batch(self) -> int:
        return self.settings.batch

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def inputs(self):
        """The Triton model's inputs (`tcgraph.serve.text_requests.serve_inputs`)."""
        return serve_inputs(self.config, self.settings)

    def request(self, arrays) -> Request | TextRequest:
        """One request from its input arrays (numpy, in the order of `inputs`; None = missing), checked:
        raises BadRequest with the message the client gets."""
        if len(arrays) != len(self.inputs):
            raise BadRequest(f"a request has {len(arrays)} inputs, this model reads {len(self.inputs)}")
        if self.config.text_conditioned:
            return check_text_request(arrays, self.inputs, max_images=self.batch)
        return check_request(*arrays, num_classes=self.num_classes, max_images=self.batch)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one output image, as `tcgraph.api.to_images` makes it."""
        channels = 3 if self.config.in_channels >= 3 else 1
        return (self.settings.resolution, self.settings.resolution, channels)

    def __enter__(self) -> "ServeSampler":
        self._runner.__enter__()
        self._dispatch = ScheduleDispatcher.for_plan(self._runner, self.artifact.plan)
        return self

    def __exit__(self, *exc) -> None:
        self._dispatch = None
        self._runner.__exit__(*exc)

    def samples(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """The float samples (N, C, H, W) of each request, in order."""
        if self._dispatch is None:
            raise RuntimeError("ServeSampler.samples outside `with`")
        if not requests:
            return []
        if self.settings.eta == 0:
            packed = self._run(self._conditioning(requests), torch.cat([self._noise(r) for r in requests]), seed=0)
            return list(torch.split(packed, [r.count for r in requests]))
        return [self._run(self._conditioning([r]), self._noise(r), seed=r.seed) for r in requests]

    def images(self, requests: Sequence[Request]) -> list[np.ndarray]:
        """The uint8 images (N, H, W, C) of each request, in order."""
        return [api.to_images(s) for s in self.samples(requests)]

    def _noise(self, request: Request) -> torch.Tensor:
        return api.make_noise(request.count, self.config.in_channels, self.settings.resolution, request.seed)

    @staticmethod
    def _conditioning(requests):
        """The class ids, or the `Text`, of these requests' images, one request after another."""
        if isinstance(requests[0], TextRequest):
            return join([r.text for r in requests])
        return [l for r in requests for l in r.labels]

    def _run(self, labels, noise: torch.Tensor, seed: int) -> torch.Tensor:
        sampler = api.sampler_for(self.settings, self.config)
        return api.run_batches(self._dispatch, self._dispatch.reset, sampler, labels, noise, self.batch, seed,
                               device=self._runner.device)
