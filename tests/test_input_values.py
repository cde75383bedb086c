"""Values are checked where they enter, with one clear error that names the real cause: text
embeddings (finite, a 0/1 mask, at least one prompt, width before length), seeds (every accepted seed
gives its own noise), the text length, samples (a non-finite sample is never a success), argument
types, and a full disk met inside the ONNX exporter."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import tcgraph
from tcgraph import api
from tcgraph.cli import main
from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models import load_model
from tcgraph.text.embeddings import Text
from tcgraph.plan import Plan
from tcgraph.sampling import SamplerSettings, make_noise
from tcgraph.sampling.conditioning import load_text
from tcgraph.sampling.runs import check_finite_samples


def _text(n=2, length=4, width=3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, length, width), torch.ones(n, length)


def test_text_embeddings_must_be_finite_and_the_mask_zero_or_one():
    e, m = _text()
    Text(e, m).checked()  # fine
    e[1, 2, 0] = float("nan")
    with pytest.raises(UsageError, match=r"of 1 of 2 prompts \(rows \[1\]\) hold NaN or infinite"):
        Text(e, m).checked()
    e, m = _text()
    with pytest.raises(UsageError, match="negative text embeddings of 1 of 2"):
        Text(e, m, torch.full_like(e, float("inf")).index_fill(0, torch.tensor([0]), 0.0), m).checked()
    with pytest.raises(UsageError, match=r"mask must hold 1 .* or 0 .*\(e.g. 0.5\)"):
        Text(e, m * 0.5).checked()
    with pytest.raises(UsageError, match="0 prompts"):
        Text(torch.zeros(0, 4, 3), torch.zeros(0, 4)).checked()
    from tcgraph.sampling.conditioning import text_argument

    with pytest.raises(UsageError, match="hold NaN or infinite"):  # a caller's Text is checked where it enters
        text_argument(Text(e * float("nan"), m), "text", "--embeddings")


def test_an_embeddings_file_of_nan_or_of_no_prompts_is_refused(tmp_path):
    e, m = _text()
    save_file({"prompt_embeds": e * float("nan"), "prompt_attention_mask": m}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UsageError, match="hold NaN or infinite values"):
        load_text(tmp_path / "nan.safetensors")
    save_file({"prompt_embeds": torch.zeros(0, 4, 3), "prompt_attention_mask": torch.zeros(0, 4)},
              str(tmp_path / "none.safetensors"))
    with pytest.raises(UsageError, match="hold 0 prompts"):
        load_text(tmp_path / "none.safetensors")


def test_text_of_the_wrong_width_is_told_about_the_width_not_the_length():
    e, m = _text(length=4, width=3)
    with pytest.raises(UsageError, match="3 values per token, but this model reads text of width 8"):
        Text(e, m).check(4, 8)
    with pytest.raises(UsageError, match="--text-length 4"):
        Text(e, m).check(6, 3)


def test_samples_that_are_not_finite_are_an_error():
    x = torch.zeros(3, 2, 4, 4)
    check_finite_samples(x)
    x[2, 0, 1, 1] = float("inf")
    x[0, 1, 0, 0] = float("nan")
    with pytest.raises(TcgraphError, match="2 of 3 samples hold NaN or infinite values, so nothing was written"):
        check_finite_samples(x)


def test_a_nan_model_writes_no_samples(demo_fora2_artifact, tmp_path):
    """The whole path: weights of NaN (hashes recomputed) give an error, and neither the PNG nor the .npy."""
    import json
    import numpy as np
    from tcgraph.export.onnx import file_sha256

    art = tmp_path / "art"
    shutil.copytree(demo_fora2_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    weights = art / m["weights"]["file"]
    weights.write_bytes(np.full(weights.stat().st_size // 4, np.nan, np.float32).tobytes())
    m["files"][m["weights"]["file"]] = file_sha256(weights)
    (art / "manifest.json").write_text(json.dumps(m))
    code = main(["sample", str(art), "--classes", "1", "--per-class", "1", "--png", str(tmp_path / "s.png"),
                 "--npy", str(tmp_path / "s.npy")])
    assert code == 1
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npy").exists()


def test_every_accepted_seed_gives_its_own_noise(demo_fora2_artifact):
    """torch's CPU generator keeps a seed's low 32 bits: 2^32 would repeat 0 and -1 would repeat 2^32-1, so
    those are refused instead of silently aliasing."""
    assert torch.equal(make_noise(2, 1, 4, 2**32), make_noise(2, 1, 4, 0))  # why: the generator aliases them
    assert not torch.equal(make_noise(2, 1, 4, 2**32 - 1), make_noise(2, 1, 4, 0))
    for bad in (2**32, -1, -(2**63), 2**63 - 1):
        with pytest.raises(UsageError, match=r"seed \(--seed\) must be an integer in 0\.\.4294967295"):
            tcgraph.sample(demo_fora2_artifact, classes="1", per_class=1, seed=bad)
    assert main(["sample", str(demo_fora2_artifact), "--seed", "4294967296"]) == 2


def test_a_text_length_of_zero_is_refused_not_replaced_by_the_default(tmp_path):
    with pytest.raises(UsageError, match=r"text length \(--text-length\) must be an integer in 1\.\."):
        api.transform("digits-text", "full", tmp_path / "a", text_length=0, progress=False)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("call, words", [
    (lambda: load_model(None), "model must be the name of a pretrained model"),
    (lambda: load_model(123), "got int 123"),
    (lambda: tcgraph.inspect(123), r"artifact must be a path \(str or pathlib.Path\), got 123"),
    (lambda: tcgraph.inspect(None), "artifact must be a path"),
    (lambda: api.inspect_pictures("x", None), r"out_dir \(--out\) must be a path"),
])
def test_arguments_of_the_wrong_type_are_one_clear_error(call, words):
    with pytest.raises(TcgraphError, match=words):
        call()


def test_a_full_disk_inside_the_onnx_exporter_names_the_disk_not_the_graph(tiny_model, tmp_path, monkeypatch):
    def full(*args, **kwargs):  # the exporter wraps the OSError of its writes in its own error types
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise RuntimeError("failed to save the ONNX model") from e

    monkeypatch.setattr(torch.onnx, "export", full)
    s = SamplerSettings(num_steps=2, batch=1, cfg_scale=1.0, resolution=8)
    plan = Plan("full", s, (tcgraph.plan.Recipe.uniform(3, tcgraph.plan.COMPUTE, ("attn", "mlp")),) * 2, 16)
    out = tmp_path / "art"
    with pytest.raises(TcgraphError, match=r"cannot write .*art: \[Errno 28\] No space left on device; free space"):
        api.transform(tiny_model, plan, out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half folder, no temporary
