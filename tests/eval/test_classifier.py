"""The committed digits classifier, its training script, and the set-level quality report built on it."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from tcgraph.data import digits_split
from tcgraph.errors import TcgraphError
from tcgraph.eval import PSNR_CAP, compare_samples, digits_quality, fd_floor, load_classifier
from tcgraph.eval.classifier import FEATURE_DIM, WEIGHTS_PATH

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_classifier.py"


@pytest.fixture(scope="module")
def split():
    return digits_split()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _uniform_noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- classifier


def test_committed_classifier_heldout_accuracy(classifier, split):
    x, y = split["test"]
    acc = float((classifier.predict(x) == y).float().mean())  # recomputed, not read from the json
    assert acc >= 0.95


def test_features_and_predict_shapes(classifier, split):
    x = split["test"][0][:5]
    with torch.no_grad():
        f = classifier.features(x)
    assert f.shape == (5, FEATURE_DIM) and f.dtype == torch.float32
    p = classifier.predict(x)
    assert p.shape == (5,) and p.dtype == torch.int64
    assert torch.equal(p, classifier(x).argmax(dim=1))


def test_features_are_full_rank_on_real_digits(classifier, split):
    # A dead penultimate unit would make the FD covariance singular.
    with torch.no_grad():
        f = classifier.features(split["test"][0]).double()
    assert (f.std(dim=0) > 1e-3).all()
    assert torch.linalg.matrix_rank(torch.cov(f.T)) == FEATURE_DIM


def test_wrong_image_shape_is_rejected(classifier):
    with pytest.raises(TcgraphError, match=r"\(N, 1, 16, 16\).*\(2, 3, 16, 16\)"):
        classifier.predict(torch.zeros(2, 3, 16, 16))


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(TcgraphError, match="train_classifier.py"):
        load_classifier(tmp_path / "absent.safetensors")


def test_damaged_weights_are_reported(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(TcgraphError, match="could not load"):
        load_classifier(bad)


def test_committed_metadata_sits_next_to_weights():
    info = json.loads(WEIGHTS_PATH.with_suffix(".json").read_text())
    assert {"heldout_accuracy", "seed", "epochs"} <= info.keys()


def test_training_script_writes_weights_and_metadata(tmp_path):
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "c.safetensors"
    threads = torch.get_num_threads()
    try:
        info = module.main(["--epochs", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # the script pins one thread; leave the session as it was
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["epochs"] == 1 and meta["seed"] == 0
    assert meta["heldout_accuracy"] == info["heldout_accuracy"] > 0.5  # one epoch is far above chance
    assert not list(tmp_path.glob("*.tmp"))
    model = load_classifier(out)
    x, y = digits_split()["test"]
    assert float((model.predict(x) == y).float().mean()) == pytest.approx(info["heldout_accuracy"], abs=1e-6)


def test_random_shift_moves_content_and_fills_background():
    spec = importlib.util.spec_from_file_location("train_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(50, 1, 1, 1)
    out = module.random_shift(x, 1, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for img in out[:, 0]:
        kept = img[img != module.BACKGROUND]
        # Every shifted image keeps a contiguous block of the original grid and pads with background.
        assert len(kept) in (9, 12, 16) and set(kept.tolist()) <= set(range(16))


# ---------------------------------------------------------------- quality report


def test_digits_quality_on_real_digits(split):
    x_test, y_test = split["test"]
    x_train, y_train = split["train"]
    real_test = digits_quality(x_test, y_test)
    real_train = digits_quality(x_train[:400], y_train[:400])
    noise = digits_quality(_uniform_noise(len(x_test)), y_test)
    assert real_test["accuracy"] >= 0.95 and real_train["accuracy"] >= 0.95
    assert real_test["n"] == len(x_test)
    assert real_test["digits_fd"] == pytest.approx(0.0, abs=1e-6)  # the reference set itself
    # Real digits from the other split sit near the floor, noise an order of magnitude above.
    assert 0 < real_train["digits_fd"] < noise["digits_fd"] / 10
    assert noise["accuracy"] < 0.5


def test_digits_quality_clamps_samples(split):
    x, y = split["test"]
    overshoot = x * 1.5  # what a sampler may return before its final clamp
    assert digits_quality(overshoot, y) == digits_quality(overshoot.clamp(-1, 1), y)


def test_digits_quality_accepts_numpy_and_lists(split):
    x, y = split["test"]
    a = digits_quality(x, y)
    b = digits_quality(x.numpy(), y.tolist())
    assert a["accuracy"] == b["accuracy"] and a["digits_fd"] == pytest.approx(b["digits_fd"], abs=1e-9)


def test_digits_quality_label_count_mismatch(split):
    x, y = split["test"]
    with pytest.raises(TcgraphError, match="359 samples but 10 labels"):
        digits_quality(x, y[:10])


def test_fd_floor_is_between_zero_and_noise(split):
    floor = fd_floor()
    assert math.isfinite(floor) and floor > 0
    assert fd_floor() == floor  # cached, same number
    noise = digits_quality(_uniform_noise(len(split["test"][0])), split["test"][1])["digits_fd"]
    assert floor < noise / 10


def test_compare_samples(split):
    x = split["test"][0][:64]
    assert compare_samples(x, x.clone()) == {"psnr": PSNR_CAP, "ssim": pytest.approx(1.0, abs=1e-12)}
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    worse = compare_samples(noisy, x)
    assert 15 < worse["psnr"] < PSNR_CAP and 0 < worse["ssim"] < 1
