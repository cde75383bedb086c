"""The text demo's vocabulary: words outside it are warned about (by name, with the vocabulary) in the
API and as one line in the CLI; a prompt of known words gives no warning; `--help` lists the words."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from tcgraph import cli, models
from tcgraph.demos import vocabulary
from tcgraph.demos.digits_text import VOCABULARY, PromptEncoder, calibration_prompts
from tcgraph.demos.vocabulary import UnknownWordsWarning, describe_vocabulary, unknown_words

HAVE_WEIGHTS = (models.PRETRAINED["digits-text"][0] / "text_encoder" / "config.json").is_file()


@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    torch.manual_seed(0)
    return PromptEncoder().eval()


def caught(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [w for w in seen if issubclass(w.category, UnknownWordsWarning)]


def test_unknown_words_in_order_each_once():
    assert unknown_words(["A handwritten CAT", "dog, 7 cat seven", "the-digit_3?"]) == ["cat", "dog"]
    assert unknown_words(["a handwritten seven", "the digit 3", "an", ""]) == []
    assert unknown_words(["<unk> </s>"]) == ["unk", "s"]  # special tokens are not words a prompt can use


def test_encode_warns_naming_exactly_the_unknown_words(encoder):
    seen = caught(lambda: encoder.encode(["a handwritten cat", "Dog 7"], negative="blurry seven"))
    assert len(seen) == 1
    w = seen[0]
    assert w.message.words == ("cat", "dog", "blurry")
    text = str(w.message)
    assert "'cat', 'dog', 'blurry'" in text and "\n" not in text
    assert text.endswith("its vocabulary: " + describe_vocabulary(encoder.vocabulary))
    for known in ("handwritten", "seven"):
        assert repr(known) not in text
    assert w.filename == __file__  # points at the caller, not at torch's no_grad wrapper


def test_known_prompts_give_no_warning(encoder):
    assert caught(lambda: encoder.encode(["a handwritten seven", "The digit 3.", "number nine", "0"])) == []
    assert caught(lambda: encoder.encode(["cat"], warn=False)) == []
    assert caught(lambda: encoder.tokenize(["cat"])) == []  # training tokenizes the templates quietly
    # the calibration prompts hold "image" on purpose ("an image of the digit ..."): no warning
    assert caught(lambda: calibration_prompts(encoder)) == []


def test_vocabulary_lists_every_word_once():
    words = describe_vocabulary().split(", ")
    assert words[-1] == "0-9" and len(words) == len(VOCABULARY) - 3 - 10 + 1
    assert not {"<pad>", "</s>", "<unk>"} & set(words)
    assert describe_vocabulary(["<pad>", "</s>", "<unk>", "a", "7"]) == "a, 7"


@pytest.mark.skipif(not HAVE_WEIGHTS, reason="digits-text weights not trained yet (python scripts/train_text_demo.py)")
def test_sampling_prompts_through_the_api_warns():
    from tcgraph.sampling.conditioning import encode_prompts

    art = SimpleNamespace(model_config=SimpleNamespace(text_conditioned=True), extra={"model": "digits-text"},
                          plan=SimpleNamespace(settings=SimpleNamespace(text_length=8)))
    seen = caught(lambda: encode_prompts(art, ["a handwritten zebra", "the digit 3"], ""))
    assert [w.message.words for w in seen] == [("zebra",)]
    assert caught(lambda: encode_prompts(art, ["a handwritten seven", "the digit 3"], "")) == []


def test_cli_shows_tcgraph_warnings_in_one_line(monkeypatch, capsys):
    def run(argv):
        warnings.warn(UnknownWordsWarning(vocabulary.unknown_words_message(["zebra"]), ["zebra"]))
        warnings.warn("someone else's warning", UserWarning)
        return 0

    monkeypatch.setattr(cli, "_run", run)
    with pytest.warns(UserWarning, match="someone else's warning") as others:
        assert cli.main(["sample"]) == 0
    assert capsys.readouterr().err.splitlines() == ["tcgraph: warning: " + vocabulary.unknown_words_message(["zebra"])]
    # any other warning goes on to Python's (here pytest's) handler, as it was
    assert [str(w.message) for w in others] == ["someone else's warning"]


def test_help_lists_the_vocabulary():
    out = subprocess.run([sys.executable, "-m", "tcgraph", "sample", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "1000"}, check=True).stdout
    assert describe_vocabulary() in out
    torch_loaded = subprocess.run([sys.executable, "-c", "import sys, tcgraph.demos.vocabulary; print('torch' in "
                                   "sys.modules)"], capture_output=True, text=True, check=True).stdout
    assert torch_loaded.strip() == "False"  # the help can list it without importing torch
