"""Displacement and strain recovered from crystals with known fields, through sheared grids.

    python benchmarks/physical_synthetic.py

Prints, for the two geometries and two crystals of ``tests/test_strain.py`` (an inclusion and a
dislocation, sampled on the input grid of APS 34-ID-C scan 54 and of an ESRF ID01 setting, with
a phase ramp and offset on top), the true and recovered RMS figures on the support and how far
the detected dislocation line is from the true one: the table in docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_strain import GEOMETRIES, dislocation_case, inclusion_case  # noqa: E402


def main() -> int:
    print(
        "| geometry | crystal | displacement RMS (nm) | its error RMS | strain RMS true "
        "| ours | dislocation line, max distance (voxels) | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, g in sorted(GEOMETRIES.items()):
        for crystal, case in (("inclusion", inclusion_case), ("dislocation", dislocation_case)):
            t = time.perf_counter()
            f = case(g)
            seconds = time.perf_counter() - t
            line = (
                f"{f['line_distance_max_voxels']:.2f} ({f['vortices']} squares)"
                if "vortices" in f
                else "-"
            )
            print(
                f"| {name} | {crystal} | {f['displacement_rms_nm']:.4f} | "
                f"{f['displacement_error_rms_nm']:.4f} "
                f"({100 * f['displacement_error_rms_nm'] / f['displacement_rms_nm']:.1f}%) | "
                f"{f['strain_rms']:.2e} | {f['our_strain_rms']:.2e} "
                f"({100 * (f['our_strain_rms'] / f['strain_rms'] - 1):+.0f}%) | {line} | "
                f"{seconds:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
