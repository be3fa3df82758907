"""qcrd_ray/isolation.py: one bad item fails alone; the rest of its batch gets what it gets when all is well."""

import pytest

from qcrd_ray.isolation import isolate_failures


def test_a_failing_input_fails_alone_in_its_batch():
    """Bisection: a batch whose generate call raises is retried in halves, so only the input that fails on its
    own gets the error and every other input gets the output it gets when all is well."""
    calls = []

    def generate(texts):
        calls.append(list(texts))
        if "bad" in texts:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return [t.upper() for t in texts]

    out = isolate_failures(generate, ["a", "b", "bad", "c", "d"])
    assert [o for i, o in enumerate(out) if i != 2] == ["A", "B", "C", "D"]
    assert isinstance(out[2], TypeError) and "TextEncodeInput" in str(out[2])
    assert calls == [["a", "b", "bad", "c", "d"], ["a", "b"], ["bad", "c", "d"], ["bad"], ["c", "d"]]

    calls.clear()
    assert isolate_failures(generate, ["a", "b", "c"]) == ["A", "B", "C"] and len(calls) == 1  # one call if fine
    calls.clear()
    out = isolate_failures(generate, ["bad", "bad", "x", "bad"])
    assert [type(o).__name__ if isinstance(o, Exception) else o for o in out] == [
        "TypeError", "TypeError", "X", "TypeError"]


def test_a_lone_failure_is_retried_and_only_the_caught_kinds_are_isolated():
    tries = {"flaky": 0}

    def run(items):
        if "flaky" in items:
            tries["flaky"] += 1
            if tries["flaky"] < 3:
                raise MemoryError("out of memory")
        if "broken" in items:
            raise ValueError("a bug, not a resource")
        return [i.upper() for i in items]

    # the batch fails once, then "flaky" alone fails once more and succeeds on its third try (attempts=3)
    assert isolate_failures(run, ["a", "flaky"], attempts=3, catch=MemoryError) == ["A", "FLAKY"]
    tries["flaky"] = -10
    out = isolate_failures(run, ["flaky", "b"], attempts=2, catch=MemoryError)
    assert isinstance(out[0], MemoryError) and out[1] == "B"
    with pytest.raises(ValueError, match="a bug"):  # not a kind the caller isolates: raised as it is
        isolate_failures(run, ["a", "broken"], catch=MemoryError)
