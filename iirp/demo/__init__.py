"""The built-in example: the ICBM 2009a template, a demo checkpoint and :func:`run_demo`.

The data in ``iirp/demo/data`` are redistributed under the notice in
``LICENSE-ICBM152.txt``; :mod:`iirp.demo._make` rebuilds them from the nilearn wheel.
"""

from __future__ import annotations

from iirp.demo.run import (
    DEMO_MAX_DISPLACEMENT,
    DEMO_SEED,
    DEMO_SHAPE,
    DEMO_SPACING,
    TISSUES,
    demo_engines,
    demo_file,
    make_demo_pair,
    run_demo,
)

__all__ = [
    "DEMO_MAX_DISPLACEMENT", "DEMO_SEED", "DEMO_SHAPE", "DEMO_SPACING", "TISSUES", "demo_engines", "demo_file",
    "make_demo_pair", "run_demo",
]
