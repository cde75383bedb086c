"""Serving an artifact on Triton Inference Server (DESIGN.md, "Serving").

`write_repository` (repository.py) makes a Triton model repository of an artifact: a
`config.pbtxt` (config.py), the artifact as version 1 and a Python-backend `model.py`
(model_template.py) that samples with the tcgraph runtime (handler.py, sampler.py: the
same functions as `tcgraph sample`; requests.py: what a request means and how it is
checked). `serve` (launch.py) runs the `tritonserver` binary of the `nvidia-pytriton`
wheel (triton.py) on localhost for one artifact (server.py). Nothing here imports Triton
or its client until it is used: the serve extra is optional.
"""
