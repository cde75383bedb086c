"""Triton Python-backend model for a tcgraph artifact (written by `tcgraph export-triton`).

Triton runs this file as `<repository>/<model>/<version>/model.py`. It loads the artifact
folder beside it (`<version>/artifact`, every file's sha256 checked) with the tcgraph
runtime, and answers each request of a batch with its images or a Triton error; a bad
request never stops the model. What a request means: tcgraph/serve/requests.py (class ids),
tcgraph/serve/text_requests.py (prompt embeddings).

A bad request is answered as a client error (INVALID_ARG: HTTP 400, gRPC INVALID_ARGUMENT)
where this Triton's Python backend can say so, else as Triton's default (HTTP 500); a
failure while sampling stays a server error. The stub runs Python isolated (no
PYTHONPATH): the package folders `tcgraph serve` names in TCGRAPH_STUB_PATH are added first.
"""
import os
import site
import sys

for _folder in os.environ.get("TCGRAPH_STUB_PATH", "").split(os.pathsep):
    if _folder and _folder not in sys.path:
        site.addsitedir(_folder)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from tcgraph.serve.handler import BatchHandler, Refusal, model_parameters  # noqa: E402
from tcgraph.serve.requests import IMAGES  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args["model_config"])
        device = params.get("device") or None
        if args.get("model_instance_kind") == "GPU":
            import torch

            torch.cuda.set_device(int(args["model_instance_device_id"]))  # one instance per GPU of the group
            device = "cuda"
        artifact = f"{args['model_repository']}/{args['model_version']}/artifact"
        self.handler = BatchHandler(artifact, backend=params.get("backend") or "ort", device=device)

    def execute(self, requests):
        inputs = []
        for request in requests:
            tensors = [pb_utils.get_input_tensor_by_name(request, name) for name in self.handler.input_names]
            inputs.append(tuple(None if t is None else t.as_numpy() for t in tensors))
        responses = []
        for answer in self.handler.answer(inputs):
            if isinstance(answer, Refusal):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(answer)))
            else:
                out = pb_utils.Tensor(IMAGES, np.ascontiguousarray(answer))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        self.handler.close()


def _error(refusal):
    """A TritonError; a client's mistake with INVALID_ARG where this backend has error codes."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None) if refusal.client else None
    if code is None:
        return pb_utils.TritonError(refusal.message)
    return pb_utils.TritonError(refusal.message, code)
