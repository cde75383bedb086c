"""The model's sampling without a server: a request's images equal `tcgraph sample`'s, bit for
bit, whatever other requests it is batched with; bad requests in a batch do not spoil the good."""
import numpy as np
import pytest
import torch

import tcgraph
from tcgraph.api import to_images
from tcgraph.export import write_artifact
from tcgraph.plan.plan import COMPUTE, Plan, Recipe
from tcgraph.serve.handler import BatchHandler, Refusal
from tcgraph.serve.requests import Request
from tcgraph.serve.sampler import ServeSampler
from tcgraph.names import BRANCHES
from tests.export.tiny_variants import BATCH, DEPTH, tiny_dit
from tests.runtime.tiny_artifact import tiny_variants


def sample(art, labels, seed):
    """`tcgraph sample` for exactly these labels (per_class 1 keeps their order) and seed."""
    samples, got = tcgraph.sample(art, classes=",".join(map(str, labels)), per_class=1, seed=seed, progress=False)
    assert got == list(labels)
    return samples


def col(values):
    return np.array(values, dtype=np.int64).reshape(-1, 1)


# Three requests of 1, 2 and 1 images: packed they fill two runs of the artifact's batch of 2,
# each request at other positions than when it is sampled alone (where it is padded).
REQUESTS = [Request((7,), 11), Request((3, 3), 4), Request((0,), 2**32 - 1)]


@pytest.fixture(scope="module")
def sampler(serve_artifact):
    with ServeSampler(serve_artifact) as s:
        yield s


def test_packed_requests_equal_tcgraph_sample_bit_for_bit(serve_artifact, sampler):
    assert sampler.batch == 2 and sampler.settings.eta == 0 and sampler.image_shape == (16, 16, 1)
    for order in (REQUESTS, REQUESTS[::-1]):
        got = sampler.samples(order)
        for request, samples in zip(order, got):
            assert torch.equal(samples, sample(serve_artifact, request.labels, request.seed)), request
    alone = sampler.samples([REQUESTS[1]])[0]
    assert torch.equal(alone, sampler.samples(REQUESTS)[1])
    images = sampler.images(REQUESTS)
    assert [i.shape for i in images] == [(1, 16, 16, 1), (2, 16, 16, 1), (1, 16, 16, 1)]
    assert all(i.dtype == np.uint8 for i in images)
    assert np.array_equal(images[1], to_images(sample(serve_artifact, (3, 3), 4)))
    # `--classes 3 --per-class 2` is the same call as CLASSES [3, 3]
    samples, _ = tcgraph.sample(serve_artifact, classes="3", per_class=2, seed=4, progress=False)
    assert torch.equal(samples, sampler.samples([REQUESTS[1]])[0])


def test_handler_answers_each_request_bad_ones_with_their_message(serve_artifact):
    handler = BatchHandler(serve_artifact)
    try:
        answers = handler.answer([(col([7]), col([11])), (col([10]), col([0])), (col([3, 3]), col([4, 4])),
                                  (col([1, 2]), col([1, 2]))])
    finally:
        handler.close()
    assert np.array_equal(answers[0], to_images(sample(serve_artifact, (7,), 11)))
    assert answers[1] == Refusal("unknown class id 10: this model has 10 classes, valid ids are 0..9", client=True)
    assert np.array_equal(answers[2], to_images(sample(serve_artifact, (3, 3), 4)))
    assert answers[3].client and "SEED must be the same on every row" in answers[3].message


def test_a_sampling_failure_is_a_server_error_not_the_clients(serve_artifact, monkeypatch):
    handler = BatchHandler(serve_artifact)
    try:
        def broken(requests):
            raise tcgraph.errors.TcgraphError("2 of 2 samples hold NaN or infinite values")

        monkeypatch.setattr(handler.sampler, "images", broken)
        answers = handler.answer([(col([7]), col([11])), (col([10]), col([0]))])
    finally:
        handler.close()
    assert answers == [Refusal("sampling failed: 2 of 2 samples hold NaN or infinite values", client=False),
                       Refusal("unknown class id 10: this model has 10 classes, valid ids are 0..9", client=True)]


@pytest.fixture(scope="module")
def eta_artifact(tmp_path_factory):
    """A tiny artifact (2 blocks, one full variant, 3 steps) with DDIM eta 0.5: fresh noise each step."""
    model = tiny_dit()
    settings = tcgraph.api.SamplerSettings(num_steps=3, cfg_scale=1.0, eta=0.5, batch=BATCH,
                                           resolution=model.config.input_size)
    full = Recipe.uniform(DEPTH, COMPUTE, BRANCHES)
    plan = Plan(planner="test", settings=settings, recipes=(full,) * 3, num_tokens=model.config.num_tokens)
    variant = tiny_variants(model)["v0"]
    return write_artifact(tmp_path_factory.mktemp("eta") / "art", model_config=model.config, plan=plan,
                          variants=[variant], verify=False)


def test_with_eta_each_request_is_sampled_as_tcgraph_sample_does(eta_artifact):
    requests = [Request((1,), 5), Request((2, 4), 6), Request((3,), 5)]
    with ServeSampler(eta_artifact) as s:
        got = s.samples(requests)
    for request, samples in zip(requests, got):
        assert torch.equal(samples, sample(eta_artifact, request.labels, request.seed)), request
    # the same labels and seed in one packed run would differ: the step noise depends on the run
    assert not torch.equal(got[0], got[2])
