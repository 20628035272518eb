"""Tolerances for parity tests: a re-export of `ms_xcomposer.tolerances`, the project's one table.

The table lives in the library because the `parity` command applies the same bounds; tests import
`TOLERANCES`, `metrics`, `assert_close` and `assert_judged` (the row, then the float64 rule for ill-conditioned
models: `tolerances.judge`) from here (or from the library) and never keep their own.
"""
from ms_xcomposer.tolerances import (FLOAT64_FACTOR, TOLERANCES, assert_close, assert_judged, judge,  # noqa: F401
                                    magnitude, metrics, tolerance)
