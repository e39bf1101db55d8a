"""STORM on every supported transformers (5.17 … newest): the KV cache's name, and no deprecation warnings of ours.

transformers 5.24 renamed `past_key_values` to `cache` in model forwards and outputs. These tests run on whichever
transformers is installed; CI runs the suite on the lowest supported version and on the newest.
"""

import logging
import warnings

import pytest
import torch
from storm_testing import VIDEO_TOKEN_ID, tiny_config, video_inputs
from transformers import DynamicCache
from transformers.utils import logging as hf_logging

from storm_transformers import StormForConditionalGeneration
from storm_transformers.modeling_storm import CACHE_NAME


def build():
    torch.manual_seed(0)
    return StormForConditionalGeneration(tiny_config()).eval()


class _Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def deprecations():
    """Messages of warnings and of transformers' logger (warning_once forgotten first) that say 'deprecat'."""
    logging.Logger.warning_once.cache_clear()  # transformers' warning_once: would hide a repeat from another test
    handler = _Messages()
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [m for m in handler.messages + [str(w.message) for w in caught] if "deprecat" in m.lower()]
    root.removeHandler(handler)


def test_the_cache_is_returned_under_the_installed_transformers_name():
    model = build()
    out = model(**video_inputs(model.config), use_cache=True)
    assert isinstance(getattr(out, CACHE_NAME), DynamicCache)
    assert CACHE_NAME in out.keys()
    import transformers

    major_minor = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    assert CACHE_NAME == ("cache" if major_minor >= (5, 24) else "past_key_values")


def test_the_old_keyword_still_continues_a_prefix(deprecations):
    """Decoding one token on top of the prompt's cache gives the logits of the full sequence, whichever keyword."""
    model = build()
    inputs = video_inputs(model.config)
    prompt = model(**inputs, use_cache=True)
    next_token = prompt.logits[:, -1:].argmax(-1)
    full = model(input_ids=torch.cat([inputs["input_ids"], next_token], 1), pixel_values_videos=inputs["pixel_values_videos"])
    for keyword in ("cache", "past_key_values"):
        cache = model(**inputs, use_cache=True)[CACHE_NAME]
        step = model(input_ids=next_token, use_cache=True, **{keyword: cache})
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
    if CACHE_NAME == "cache":  # on 5.24+, the old name warns (transformers' own deprecation), as for its models
        assert deprecations()


def test_logits_to_keep_gives_the_last_positions():
    model = build()
    inputs = video_inputs(model.config)
    full = model(**inputs).logits
    torch.testing.assert_close(model(**inputs, logits_to_keep=1).logits, full[:, -1:])
    torch.testing.assert_close(model(**inputs, logits_to_keep=3).logits, full[:, -3:])
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(model(**inputs, logits_to_keep=keep).logits, full[:, keep])


def test_our_code_triggers_no_deprecation_warning(deprecations):
    """Forward, training loss and backward, generation with and without cache, outputs read by their current names."""
    model = build()
    inputs = video_inputs(model.config)
    out = model(**inputs, use_cache=True)
    assert out.video_outputs.pooler_output.shape[1] == model.config.num_video_tokens(4)
    getattr(out, CACHE_NAME)
    model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    model.train()
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == VIDEO_TOKEN_ID, -100)
    model(**inputs, labels=labels).loss.backward()
    assert deprecations() == []
