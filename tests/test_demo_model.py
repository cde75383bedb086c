"""The committed demo model generates recognisable digits (measured, not assumed)."""
import pytest

from tcgraph import api
from tcgraph.eval import digits_quality
from tcgraph.sampling import SamplerSettings


@pytest.mark.slow
def test_demo_model_samples_are_classified_as_their_class():
    model = api.load_dit("digits")
    s = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=50, resolution=16)
    labels = [c for c in range(10) for _ in range(5)]
    samples = api.sample_eager(model, s, labels, seed=123)
    q = digits_quality(samples, labels)
    assert q["accuracy"] >= 0.85, q  # the benchmark measures >= 90 % on 360 images
