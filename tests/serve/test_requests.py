"""What a request means, and one clear message for each kind of bad request (no server needed)."""
import numpy as np
import pytest

from tcgraph.api import MAX_SEED
from tcgraph.serve.requests import BadRequest, Request, check_request


def col(*values, dtype=np.int64):
    return np.array(values, dtype=dtype).reshape(-1, 1)


def check(classes, seed):
    return check_request(classes, seed, num_classes=10, max_images=4)


def test_a_good_request_is_its_labels_and_seed():
    assert check(col(3, 3, 9), col(7, 7, 7)) == Request(labels=(3, 3, 9), seed=7)
    assert check(np.array([0], dtype=np.int64), np.array([5], dtype=np.int64)) == Request((0,), 5)  # [n] also
    assert check(col(1), col(2**32 - 1)).seed == 2**32 - 1 == MAX_SEED  # the seeds `tcgraph sample` takes


@pytest.mark.parametrize("classes, seed, message", [
    (col(10), col(0), "unknown class id 10: this model has 10 classes, valid ids are 0..9"),
    (col(-1, 12, 3), col(0, 0, 0), "unknown class id -1 (and 1 more): this model has 10 classes"),
    (col(), col(), "CLASSES is empty: ask for at least one image"),
    (col(1, 2, 3, 4, 5), col(0, 0, 0, 0, 0), "asks for 5 images, more than the 4 one request may hold"),
    (col(1.0, dtype=np.float32), col(0), "input CLASSES must be INT64, got float32"),
    (col(1), col(0, dtype=np.int32), "input SEED must be INT64, got int32"),
    (np.zeros((2, 2), np.int64), col(0, 0), "input CLASSES must have shape [n, 1] (one row per image), got [2, 2]"),
    (col(1, 2), col(0), "SEED has 1 rows and CLASSES 2: give the seed on every row"),
    (col(1, 2), col(5, 6), "SEED must be the same on every row of a request (one request = one seed), got 2"),
    (None, col(0), "input CLASSES is missing"),
    (col(1), col(2**32), "SEED must be in 0..4294967295 (the seeds `tcgraph sample --seed` takes: torch's "
                         "generator keeps only the low 32 bits, so 4294967296 would repeat another seed's images), "
                         "got 4294967296"),
    (col(1), col(-1), "SEED must be in 0..4294967295"),
    (col(1, 1), col(-2**63, -2**63), "got -9223372036854775808"),
])
def test_bad_requests_get_one_clear_message(classes, seed, message):
    with pytest.raises(BadRequest) as e:
        check(classes, seed)
    assert message in str(e.value)


def test_seeds_past_32_bits_are_refused_because_they_repeat_other_seeds():
    from tcgraph.api import make_noise

    for low, high in ((0, 2**32), (5, 2**32 + 5), (2**32 - 1, -1), (0, -2**63)):
        assert make_noise(1, 1, 4, low).equal(make_noise(1, 1, 4, high))  # torch keeps the low 32 bits
        assert check(col(1), col(low)).seed == low
        with pytest.raises(BadRequest, match=f"SEED must be in 0..4294967295 .*, got {high}$"):
            check(col(1), col(high))


def test_sample_refuses_the_same_seeds(serve_artifact, tmp_path, capsys):
    from tcgraph.cli import main

    for seed in ("4294967296", "-1"):
        assert main(["sample", str(serve_artifact), "--seed", seed, "--png", str(tmp_path / "s.png")]) == 2
        assert capsys.readouterr().err == (f"tcgraph: error: seed (--seed) must be an integer in 0..4294967295, "
                                           f"got {seed}\n")
    assert not (tmp_path / "s.png").exists()
