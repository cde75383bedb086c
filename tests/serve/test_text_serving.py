"""Serving a text-conditioned model from prompt embeddings: the inputs each model declares (PixArt: mask and
the negative prompt's for CFG; FLUX: pooled embeddings, guidance an input), a request's images equal
`tcgraph sample`'s from the same embeddings bit for bit whatever it is packed with, bad requests get one
line, and a real Triton server answers as the sampler does (skipped without the serve extra)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tcgraph
from tcgraph.api import to_images
from tcgraph.serve.handler import BatchHandler, Refusal
from tcgraph.serve.repository import write_repository
from tcgraph.serve.sampler import ServeSampler
from tcgraph.serve.text_requests import TextRequest, serve_inputs
from tcgraph.text.embeddings import Text

pytest.importorskip("diffusers")

PIXART = ["PROMPT_EMBEDS", "PROMPT_MASK", "NEGATIVE_EMBEDS", "NEGATIVE_MASK", "SEED"]
FLUX = ["PROMPT_EMBEDS", "POOLED_EMBEDS", "SEED"]


@pytest.fixture(scope="module")
def flux_artifact(tmp_path_factory):
    """A tiny random FLUX.1-dev transformer (pooled embeddings, guidance an input): fora:2, 3 steps, batch 2."""
    from tests.models.flux_tiny import tiny_config, tiny_diffusers
    from tcgraph.models.diffusers.flux import wrap

    config = tiny_config(guidance_embeds=True, depth=2, single_depth=1)
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    return tcgraph.transform(wrap(tiny_diffusers(config, seed=3), config), "fora:2",
                             tmp_path_factory.mktemp("serve-flux") / "art", steps=3, batch=2, text_length=5,
                             scheduler=scheduler, progress=False, check=False)


def random_text(art, n: int, seed: int, negative: bool) -> Text:
    """n rows of random embeddings of `art`'s shapes (a mask with padding; pooled where the model reads it)."""
    s, cfg = art.plan.settings, art.model_config
    g = torch.Generator().manual_seed(seed)
    pooled = getattr(cfg, "pooled_channels", 0)

    def one():
        e = torch.randn(n, s.text_length, cfg.caption_channels, generator=g)
        mask = torch.ones(n, s.text_length)
        if not pooled:
            mask[:, s.text_length // 2 + 1:] = 0  # padding after the prompt's tokens
        return e, mask, (torch.randn(n, pooled, generator=g) if pooled else None)

    e, m, p = one()
    ne, nm, np_ = one() if negative else (None, None, None)
    return Text(e, m, ne, nm, p, np_)


def arrays(text: Text, names, seed: int) -> tuple:
    """A request's input arrays in the model's order, as a client sends them."""
    rows = {"PROMPT_EMBEDS": text.embeddings, "PROMPT_MASK": text.mask, "POOLED_EMBEDS": text.pooled,
            "NEGATIVE_EMBEDS": text.negative_embeddings, "NEGATIVE_MASK": text.negative_mask,
            "NEGATIVE_POOLED": text.negative_pooled}
    out = tuple(rows[n].numpy().astype(np.float32) for n in names[:-1])
    return out + (np.full((len(text), 1), seed, dtype=np.int64),)


def sample(art_path, text: Text, seed: int) -> torch.Tensor:
    samples, _ = tcgraph.sample(art_path, text=text, per_class=1, seed=seed, progress=False)
    return samples


@pytest.mark.parametrize("which", ["pixart", "flux"])
def test_packed_text_requests_equal_tcgraph_sample_bit_for_bit(which, text_artifact, flux_artifact):
    path = text_artifact if which == "pixart" else flux_artifact
    with ServeSampler(path) as s:
        names = [i.name for i in s.inputs]
        assert names == (PIXART if which == "pixart" else FLUX)
        assert s.inputs == serve_inputs(s.config, s.settings)
        guided = s.settings.doubles_batch
        sizes = (1, s.batch, 1)  # PixArt's batch is 1, FLUX's 2: packed, a request lands at other positions
        texts = [random_text(s.artifact, n, seed, guided) for seed, n in enumerate(sizes)]
        requests = [s.request(arrays(t, names, seed)) for t, seed in zip(texts, (11, 4, 2**32 - 1))]
        assert all(isinstance(r, TextRequest) for r in requests) and [r.count for r in requests] == list(sizes)
        for order in (requests, requests[::-1]):
            for r, got in zip(order, s.samples(order)):
                assert torch.equal(got, sample(path, r.text, r.seed))
        assert not torch.equal(s.samples(requests[:1])[0], sample(path, texts[1].take([0]), 11))  # the text matters


def test_bad_text_requests_get_one_line_each(text_artifact):
    handler = BatchHandler(text_artifact)
    try:
        names = handler.input_names
        good = arrays(random_text(handler.sampler.artifact, 1, 0, negative=True), names, 5)
        e, m, ne, nm, seed = good
        cases = [
            ((e, m, None, nm, seed), "input NEGATIVE_EMBEDS is missing: this model reads PROMPT_EMBEDS, PROMPT_MASK, "
                                     "NEGATIVE_EMBEDS, NEGATIVE_MASK, SEED"),
            ((e[:, :-1], m, ne, nm, seed), "input PROMPT_EMBEDS must have shape [n, 7, 24]"),
            ((e.astype(np.float64), m, ne, nm, seed), "input PROMPT_EMBEDS must be FP32, got float64"),
            ((e, m * 0.5, ne, nm, seed), "input PROMPT_MASK must hold 0 (padding) and 1 (token) only"),
            ((np.full_like(e, np.nan), m, ne, nm, seed), "input PROMPT_EMBEDS holds NaN or infinite values"),
            ((e, m, ne, nm, np.array([[-1]], dtype=np.int64)), "SEED must be in 0..4294967295"),
            ((np.concatenate([e, e]), np.concatenate([m, m]), ne, nm, np.full((2, 1), 5, dtype=np.int64)),
             "input NEGATIVE_EMBEDS has 1 rows and PROMPT_EMBEDS 2: one row per image"),
            ((e[:0], m[:0], ne[:0], nm[:0], seed[:0]), "input PROMPT_EMBEDS is empty"),
        ]
        answers = handler.answer([c for c, _ in cases] + [good])
    finally:
        handler.close()
    for (_, message), answer in zip(cases, answers):
        assert isinstance(answer, Refusal) and answer.client and answer.message.startswith(message), answer
    want = to_images(sample(text_artifact, random_text(handler.sampler.artifact, 1, 0, negative=True), 5))
    assert np.array_equal(answers[-1], want)


def test_export_declares_the_text_inputs(flux_artifact, tmp_path):
    write_repository(flux_artifact, tmp_path / "repo", name="flux")
    config = (tmp_path / "repo" / "flux" / "config.pbtxt").read_text()
    assert ('  { name: "PROMPT_EMBEDS" data_type: TYPE_FP32 dims: [ 5, 12 ] },\n'
            '  { name: "POOLED_EMBEDS" data_type: TYPE_FP32 dims: [ 10 ] },\n'
            '  { name: "SEED" data_type: TYPE_INT64 dims: [ 1 ] }\n]') in config
    assert "max_batch_size: 2" in config and "CLASSES" not in config


def test_a_triton_server_answers_text_requests_as_the_sampler(text_artifact, tmp_path):
    """`tcgraph serve` on the PixArt artifact: the model's metadata lists its text inputs; an HTTP request's
    images equal `tcgraph sample`'s from the same embeddings; a bad one is a client error (400)."""
    import signal
    import subprocess
    import time
    from pathlib import Path

    pytest.importorskip("pytriton", reason="the serve extra is not installed (pip install -e '.[serve]')")
    http = pytest.importorskip("tritonclient.http", reason="the serve extra is not installed (tritonclient[http])")
    from tritonclient.utils import InferenceServerException

    from tcgraph.serve.server import Ports
    from tests.processes import stop
    from tests.serve.test_triton import free_base_port, serve_command

    port = free_base_port()
    log = tmp_path / "out"
    with open(log, "w") as out:
        proc = subprocess.Popen([*serve_command(), "serve", str(text_artifact), "--port", str(port), "--name", "pixart"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = None
    try:
        deadline = time.monotonic() + 240
        while "stop with Ctrl-C" not in Path(log).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tcgraph serve did not start: {Path(log).read_text()[-2000:]}")
            time.sleep(0.2)
        client = http.InferenceServerClient(f"127.0.0.1:{Ports.from_base(port).http}")
        meta = client.get_model_metadata("pixart")
        assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
            ("PROMPT_EMBEDS", "FP32", [-1, 7, 24]), ("PROMPT_MASK", "FP32", [-1, 7]),
            ("NEGATIVE_EMBEDS", "FP32", [-1, 7, 24]), ("NEGATIVE_MASK", "FP32", [-1, 7]), ("SEED", "INT64", [-1, 1])]
        art = tcgraph.export.artifact.load_artifact(text_artifact)
        text = random_text(art, 1, 9, negative=True)

        def infer(values):
            inputs = []
            for name, value in zip(PIXART, values):
                i = http.InferInput(name, list(value.shape), "INT64" if name == "SEED" else "FP32")
                i.set_data_from_numpy(value)
                inputs.append(i)
            return client.infer("pixart", inputs).as_numpy("IMAGES")

        good = arrays(text, PIXART, 6)
        assert np.array_equal(infer(good), to_images(sample(text_artifact, text, 6)))
        with pytest.raises(InferenceServerException) as e:
            infer((good[0], good[1] * 0.5, *good[2:]))
        assert "input PROMPT_MASK must hold 0 (padding) and 1 (token) only" in e.value.message()
        assert e.value.status() == "400"
    finally:
        if client is not None:
            client.close()
        stop(proc)
