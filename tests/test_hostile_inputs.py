"""The hostile-input corpus (`tests/hostile_inputs.py`): every case a clear error or accepted correctly.

Prints `hostile inputs: N cases, E clear errors, A accepted, U unclear crashes, S silent wrong results, R valid inputs
rejected` and fails on any unclear crash, silent wrong result or rejected valid input, listing them.
"""

from hostile_inputs import CASES, Case, WrongResult, _numbered, classify, read, run_cases, same_frames, summary


def test_every_hostile_input_is_a_clear_error_or_accepted(tmp_path, capsys):
    results = run_cases(CASES, tmp_path)
    with capsys.disabled():
        print(f"\n{summary(results)}")
    bad = [f"{outcome}: [{case.area}] {case.name}: {message[:300]}" for case, outcome, message in results
           if outcome not in ("clear error", "accepted")]
    assert not bad, "\n".join(bad)
    assert len(CASES) >= 250 and {case.area for case in CASES} >= {
        "config", "cli", "checkpoint", "training data", "training args", "conversion", "video file", "sampling",
        "frames", "processor", "model",
    }


def _raise(error):
    def call(folder):
        raise error

    return call


def test_the_classifier_tells_the_outcomes_apart(tmp_path):
    """The corpus can fail: each outcome is recognised (a gate that cannot fail would be worthless)."""
    cases = {
        "clear error": Case("x", "a", _raise(ValueError("num_frames=0 must be >= 1")), names=("num_frames=0",)),
        "unclear crash": Case("x", "b", _raise(ZeroDivisionError("division by zero")), names=()),
        "silent wrong result": Case("x", "c", lambda folder: 32, names=("num_frames",)),
        "accepted": Case("x", "d", lambda folder: 8192, expect="accept", check=lambda tokens: tokens == 8192),
        "valid input rejected": Case("x", "e", _raise(ValueError("no")), expect="accept"),
    }
    for outcome, case in cases.items():
        assert classify(case, tmp_path)[0] == outcome, outcome
    unnamed = Case("x", "f", _raise(ValueError("need at least one array to stack")), names=("num_frames",))
    raw = Case("x", "g", _raise(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")), names=())
    wrong = Case("x", "h", _raise(WrongResult("the pickle ran")))
    wrong_value = Case("x", "i", lambda folder: 7, expect="accept", check=lambda tokens: tokens == 8192)
    # A decoder that returned each frame's neighbour: the frames carry their own index, so the check sees it.
    neighbours = Case("x", "j", lambda folder: read(_numbered(folder, "clip.mp4"), [1, 4]), expect="accept",
                      check=same_frames([0, 3]))
    assert [classify(case, tmp_path)[0] for case in (unnamed, raw, wrong, wrong_value, neighbours)] == [
        "unclear crash", "unclear crash", "silent wrong result", "silent wrong result", "silent wrong result"
    ]
