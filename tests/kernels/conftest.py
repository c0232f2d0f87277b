"""Keeps the interpreted Pallas backends' (score, bias) matrix inside the default suite's time budget.

Each interpreted Pallas case costs 5-30 s on 2 cores. By default every Pallas backend runs the two fullest
combinations (SiLU and softmax, each with ALiBi + time bias) in both modes; the combinations whose features
those already exercise (softmax without bias, ALiBi alone) run with `-m slow` (`make test-slow`). The XLA
backend is cheap and runs the whole matrix by default.
"""

import pytest

COMBO_TESTS = ("test_scores_and_biases_full", "test_scores_and_biases_cached")
DEFAULT_COMBOS = ("silu-alibi+time", "softmax-alibi+time")


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        # The hook sees every item of the session (notebooks included), not only this folder's.
        implementation = getattr(getattr(item, "cls", None), "IMPLEMENTATION", "xla")
        if implementation == "xla" or getattr(item, "originalname", None) not in COMBO_TESTS:
            continue
        combo = item.callspec.id.removesuffix("-True").removesuffix("-False")  # the cached tests add self_term
        if combo not in DEFAULT_COMBOS:
            item.add_marker(pytest.mark.slow)
