"""Serving an artifact on Triton Inference Server (docs/design.md, "Serving").

`write_repository` (repository.py) writes one model folder of an artifact into a Triton
model repository, which other models may share: a `config.pbtxt` (config.py), the artifact as
version 1, a Python-backend `model.py` (model_template.py) that samples with the tcgraph
runtime (handler.py, sampler.py: the same functions as `tcgraph sample`; requests.py: what a
request means and how it is checked), and a marker of what it wrote (marker.py), by which
it recognises the only folders it may replace (placement.py: where, and atomically).
`serve` (launch.py) runs the `tritonserver` binary of the `nvidia-pytriton` wheel (triton.py)
on localhost for one artifact (server.py). Nothing here imports Triton or its client until it
is used: the serve extra is optional.
"""
