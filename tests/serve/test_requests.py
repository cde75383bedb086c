"""What a request means, and one clear message for each kind of bad request (no server needed)."""
import numpy as np
import pytest

from tcgraph.serve.requests import BadRequest, Request, check_request


def col(*values, dtype=np.int64):
    return np.array(values, dtype=dtype).reshape(-1, 1)


def check(classes, seed):
    return check_request(classes, seed, num_classes=10, max_images=4)


def test_a_good_request_is_its_labels_and_seed():
    assert check(col(3, 3, 9), col(7, 7, 7)) == Request(labels=(3, 3, 9), seed=7)
    assert check(np.array([0], dtype=np.int64), np.array([-5], dtype=np.int64)) == Request((0,), -5)  # [n] also
    assert check(col(1), col(2**63 - 1)).seed == 2**63 - 1


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
])
def test_bad_requests_get_one_clear_message(classes, seed, message):
    with pytest.raises(BadRequest) as e:
        check(classes, seed)
    assert message in str(e.value)
