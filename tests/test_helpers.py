"""The shared helpers of conftest.py: the comparison fails where it should, the check of
process-wide settings sees a change, and conftest.py imports without the optional extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    AUTOCAST_TOLERANCES,
    SAME_DTYPE_TOLERANCES,
    SETTINGS_AT_START,
    TOLERANCES,
    assert_close,
    assert_equal,
    changed_settings,
    process_settings,
)


def test_a_mismatch_names_its_positions_and_values():
    expected = torch.zeros(3, 4)
    actual = expected.clone()
    actual[1, 2] = 0.5
    assert_close(actual, expected, atol=0.5)
    with pytest.raises(pytest.fail.Exception, match=r"grad: 1 of 12 elements differ .*\(1, 2\): 0\.5 vs 0\.0"):
        assert_close(actual, expected, atol=0.25, what="grad")
    with pytest.raises(pytest.fail.Exception, match="1 of 12"):
        assert_close(actual.double(), expected.double(), torch.float32)  # 0.5 > 1e-4 + 1e-4 * 0


def test_equal_infinities_match_and_nan_never_does():
    inf = torch.tensor([float("inf"), -float("inf")])
    assert_equal(inf, inf.clone())
    nan = torch.tensor([float("nan")])
    with pytest.raises(pytest.fail.Exception, match="1 of 1"):
        assert_equal(nan, nan.clone())


def test_dtypes_and_shapes_must_match_unless_against_a_reference():
    with pytest.raises(AssertionError, match="dtype"):
        assert_equal(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert_close(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.float64), torch.bfloat16)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(2), torch.zeros(3), torch.float32)
    with pytest.raises(TypeError, match="not both"):
        assert_close(torch.zeros(2), torch.zeros(2), torch.float32, atol=1.0)


def test_each_tolerance_table_covers_its_dtypes():
    floats = {torch.float64, torch.float32, torch.bfloat16, torch.float16}
    assert set(TOLERANCES) == set(SAME_DTYPE_TOLERANCES) == floats
    assert set(AUTOCAST_TOLERANCES) == {torch.bfloat16, torch.float16}


def test_conftest_imports_without_the_optional_extras():
    """tokenizers and transformers are optional: conftest.py imports them only inside the
    helper that needs them, so a test run without them still collects."""
    blocked = ", ".join(f"{name!r}: None" for name in ("tokenizers", "transformers", "accelerate", "peft"))
    script = (
        f"import sys; sys.modules.update({{{blocked}}}); sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import conftest; assert callable(conftest.train_bpe_tokenizer)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_settings_check_names_frozen_backend_flags_and_a_changed_default_dtype():
    """What importing torch.testing._internal does (freeze torch.backends' flags), and a
    default dtype left changed, each show in the check every test file's end runs."""
    assert changed_settings(SETTINGS_AT_START, process_settings()) == ""
    with torch.backends.__allow_nonbracketed_mutation():  # puts the flag back on exit
        torch.backends.disable_global_flags()
        frozen = changed_settings(SETTINGS_AT_START, process_settings())
    assert frozen == "torch.backends.flags_frozen(): False -> True"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        changed = changed_settings(SETTINGS_AT_START, process_settings())
    finally:
        torch.set_default_dtype(previous)
    assert changed == "torch.get_default_dtype(): torch.float32 -> torch.float64"
    assert changed_settings(SETTINGS_AT_START, process_settings()) == ""
