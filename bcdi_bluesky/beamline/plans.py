"""Bluesky plans for BCDI."""

from __future__ import annotations

from typing import Any

import bluesky.plans as bp


def rocking_scan(detector: Any, motor: Any, centre: float, width: float, num: int, *,
                 md: dict | None = None, **bcdi_metadata: Any):
    """A rocking curve: ``num`` frames with ``motor`` from ``centre - width/2`` to
    ``centre + width/2``, with the metadata the reconstruction callback records.

    Parameters
    ----------
    detector : ophyd device
        The area detector (its image key is ``<name>_image``).
    motor : ophyd positioner
        The rocking motor.
    centre, width : float
        Rocking range (motor units, degrees for an angle).
    num : int
        Number of frames.
    md : dict, optional
        Extra start-document metadata.
    **bcdi_metadata
        Geometry when known (``energy_kev``, ``detector_distance_m``, ``pixel_size_m``,
        ``bragg_angle_deg``, ``hkl``...), stored under ``md["bcdi"]``.
    """
    if num < 2:
        raise ValueError(f"a rocking scan needs at least 2 frames, got {num}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    step = width / (num - 1)
    start = centre - step * (num // 2)
    stop = start + step * (num - 1)
    meta = {"plan_name": "rocking_scan",
            "bcdi": {"rocking_motor": motor.name, "detector": detector.name,
                     "rocking_step": step, "rocking_centre": centre, **bcdi_metadata},
            **(md or {})}
    return (yield from bp.scan([detector], motor, start, stop, num, md=meta))
