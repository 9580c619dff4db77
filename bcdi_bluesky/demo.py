"""``bcdi-bluesky demo``: the whole loop on the embedded simulated beamline.

A RunEngine, the reconstruction callback, the in-process IOC and a closed-loop series of rocking
scans that starts misaligned: live progress on stderr, a summary table, figures and CXI files in
an output folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .beamline.publishers import Publisher
from .files import save_figure
from .physics import align, compare_objects
from .pipeline import to_model_grid


class _Progress(Publisher):
    """Publisher that narrates each scan on a text stream."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = 0.0

    def _say(self, start: dict, text: str) -> None:
        print(f"scan {start.get('scan_id')}: {text}", file=self.stream, flush=True)

    def collecting(self, start: dict) -> None:
        md = start.get("bcdi", {})
        self._say(start, f"rocking scan around {md.get('rocking_centre', float('nan')):.4f} deg")

    def progress(self, stage: str, info: dict, start: dict) -> None:
        if stage == "es_step":
            now = time.monotonic()
            if now - self.last > 0.5:
                self.last = now
                self._say(start, f"  ES iteration {info['iteration']}, chi {info['cost']:.4f}")
        elif stage in ("preprocess", "inference", "refine", "polish"):
            extra = f", chi {info['chi']:.4f}" if "chi" in info else ""
            self._say(start, f"  {stage} done in {info['seconds']:.2f} s{extra}")

    def failure(self, message: str, start: dict) -> None:
        self._say(start, f"  not reconstructed: {message}")

    def __call__(self, result: Any, start: dict) -> None:
        self._say(
            start,
            f"  done: chi {result.chi:.4f} in {result.timings['total']:.2f} s, "
            f"quality {result.quality}" + "".join(f"\n    - {r}" for r in result.quality_reasons),
        )


def _figures(out: Path, beamline, records: list, history: list) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .physics import central_slices
    from .plotting import plot_reconstruction

    paths = []
    for record in records:
        if record.result is not None:
            paths.append(
                plot_reconstruction(
                    record.result,
                    out / f"scan_{record.scan_id}.png",
                    title=f"scan {record.scan_id}",
                )
            )
    last = next((r for r in reversed(records) if r.result is not None), None)
    if last is not None:
        truth = beamline.crystal.truth()
        recon = align(truth, to_model_grid(last.result.object, truth.shape[0]))
        sup_t = np.abs(truth) > 0.2 * np.abs(truth).max()
        sup_r = np.abs(recon) > 0.2 * np.abs(recon).max()
        fig, axes = plt.subplots(4, 3, figsize=(10, 12), layout="constrained")
        rows = [
            ("hidden crystal, amplitude", np.abs(truth), "gray", None),
            ("reconstruction, amplitude", np.abs(recon), "gray", None),
            (
                "hidden crystal, phase (rad)",
                np.where(sup_t, np.angle(truth), np.nan),
                "twilight",
                (-np.pi, np.pi),
            ),
            (
                "reconstruction, phase (rad)",
                np.where(sup_r, np.angle(recon), np.nan),
                "twilight",
                (-np.pi, np.pi),
            ),
        ]
        idx = np.argwhere(sup_t)
        lo, hi = np.maximum(idx.min(0) - 4, 0), idx.max(0) + 5
        window = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        for r, (label, vol, cmap, lim) in enumerate(rows):
            for c, (plane, img) in enumerate(central_slices(vol[window]).items()):
                ax = axes[r, c]
                kw = {"vmin": lim[0], "vmax": lim[1]} if lim else {}
                ax.imshow(img, cmap=cmap, origin="lower", **kw)
                ax.set_title(f"{label}\n{plane} plane", fontsize=9)
        iou = compare_objects(truth, recon).iou
        fig.suptitle(f"scan {last.scan_id}: truth vs reconstruction (support IoU {iou:.2f})")
        paths.append(out / "truth_vs_reconstruction.png")
        save_figure(fig, paths[-1], dpi=80)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for record in records:
        if record.result is not None and record.result.es_costs:
            ax.plot(record.result.es_costs, label=f"scan {record.scan_id}")
    ax.set_xlabel("ES step (300 on the central q cube, then the full grid)")
    ax.set_ylabel("chi")
    ax.set_yscale("log")
    ax.set_title("extremum seeking: chi per step")
    if ax.lines:
        ax.legend()
    else:  # every scan skipped (the first misses the peak): say so rather than draw nothing
        ax.text(0.5, 0.5, "no scan was refined", ha="center", va="center", transform=ax.transAxes)
    paths.append(out / "es_cost.png")
    save_figure(fig, paths[-1], dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    scans = [h["iteration"] + 1 for h in history]
    ax.plot(scans, [h["centre"] for h in history], "o-", label="scan centre")
    ax.plot(scans, [h["theta_center"] for h in history], "s--", label="recommended next centre")
    ax.axhline(beamline.crystal.peak_theta, color="k", ls=":", label="true Bragg peak")
    ax.set_xlabel("scan")
    ax.set_ylabel("theta (deg)")
    ax.set_xticks(scans)
    ax.set_title("closed loop: rocking centre per scan")
    ax.legend()
    paths.append(out / "closed_loop.png")
    save_figure(fig, paths[-1], dpi=90)
    plt.close(fig)
    return paths


def _or_nan(value: float | None) -> float:
    """A table cell: NaN for a figure a skipped scan does not have."""
    return float("nan") if value is None else value


def run_demo(
    scans: int = 3,
    output: str | None = None,
    prefix: str | None = None,
    linger: float = 0.0,
    seed: int = 0,
    as_json: bool = False,
    stream: TextIO = sys.stderr,
) -> dict:
    """Run the demo; returns the JSON-able summary (``scans``, ``output``)."""
    from bluesky import RunEngine

    from .beamline import (
        BCDIReconstructionCallback,
        ReconstructionAnalysis,
        ResultFileWriter,
        SimulatedBeamline,
        closed_loop_scan,
    )
    from .epics import IOCPublisher
    from .pipeline import Reconstructor

    if scans < 1:
        raise ValueError(f"--scans must be at least 1, got {scans}")
    out = Path(output) if output else Path(tempfile.mkdtemp(prefix="bcdi_demo_"))
    out.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f"DEMO{uuid.uuid4().hex[:4].upper()}:"
    # Serve on loopback unless the user configured EPICS networking; a missing repeater only
    # costs a beacon warning, which the demo keeps off the terminal.
    interfaces = None if "EPICS_CAS_INTF_ADDR_LIST" in os.environ else ["127.0.0.1"]
    logging.getLogger("caproto").setLevel(logging.CRITICAL)
    print(
        f"bcdi-bluesky demo: simulated beamline (seed {seed}), sample misaligned; IOC prefix "
        f"{prefix}; outputs in {out}",
        file=stream,
        flush=True,
    )
    beamline = SimulatedBeamline(seed=seed, misalignment=0.25)
    beamline.det.exposure.put(0.05)
    ioc = IOCPublisher(prefix=prefix, interfaces=interfaces)
    cb = BCDIReconstructionCallback(
        reconstructor=Reconstructor(),
        publishers=[
            ioc,
            ResultFileWriter(out),
            _Progress(stream),
        ],
        keep_results=max(scans, 1),
    )  # the figures show every scan's reconstruction
    RE = RunEngine({}, context_managers=[], call_returns_result=True)
    RE.subscribe(cb)
    analysis = ReconstructionAnalysis(name="analysis", callback=cb)
    step = beamline.crystal.step
    history = RE(
        closed_loop_scan(
            beamline.det,
            beamline.theta,
            analysis,
            beamline.crystal.bragg_theta,
            63 * step,
            64,
            max_iterations=scans,
            until_converged=False,
            geometry=beamline.geometry,
        )
    ).plan_result
    cb.wait(timeout=300)
    records = list(cb.records.values())
    truth = beamline.crystal.truth()
    rows = []
    for h, record in zip(history, records, strict=False):
        result = record.result
        # None (JSON null) where the scan was not reconstructed, like its chi.
        iou = (
            compare_objects(truth, to_model_grid(result.object, truth.shape[0])).iou
            if result is not None
            else None
        )
        rec = record.recommendation
        rows.append(
            {
                "scan_id": record.scan_id,
                "theta_center": h["centre"],
                "exposure": record.exposure,
                "max_count": rec.max_count_observed if rec else None,
                "saturated": rec.saturated if rec else None,
                "peak_inside": rec.peak_inside if rec else None,
                "chi": result.chi if result is not None else None,
                "iou": iou,
                "quality": result.quality if result is not None else None,
                "quality_reasons": list(result.quality_reasons) if result is not None else [],
                "timings_s": result.timings if result is not None else {},
                "status": record.status,
                "message": record.message,
            }
        )
    figures = _figures(out, beamline, records, history)
    latent_map = cb.reconstructor.runtime.latent_map
    if latent_map is not None:
        from .plotting import plot_latent_map

        figures.append(
            plot_latent_map(
                latent_map,
                out / "latent_map.png",
                scans=[
                    (f"scan {r.scan_id}", r.result.latent_xy, r.result.out_of_distribution)
                    for r in records
                    if r.result is not None and r.result.latent_xy is not None
                ],
            )
        )
    summary = {
        "scans": rows,
        "output": str(out),
        "ioc_prefix": prefix,
        "true_peak_theta": beamline.crystal.peak_theta,
        "figures": [str(p) for p in figures],
    }
    header = (
        f"{'scan':>4} {'theta centre':>12} {'exposure':>9} {'max count':>9} {'chi':>7} "
        f"{'IoU':>5} {'quality':>8} {'prep':>5} {'CNN':>5} {'ES':>5} {'polish':>6} "
        f"{'total':>6}"
    )
    lines = [header]
    for r in rows:
        t = r["timings_s"]
        lines.append(
            f"{r['scan_id']:>4} {r['theta_center']:>12.4f} {r['exposure'] or 0:>9.3g} "
            f"{r['max_count'] or 0:>9.0f} {_or_nan(r['chi']):>7.4f} {_or_nan(r['iou']):>5.2f} "
            f"{r['quality'] or r['status']:>8} "
            f"{t.get('preprocess', 0):>5.2f} {t.get('inference', 0):>5.2f} "
            f"{t.get('refine', 0):>5.2f} {t.get('polish', 0):>6.2f} {t.get('total', 0):>6.2f}"
        )
        if r["chi"] is None:  # skipped or failed: say why
            lines.append(f"{'':>4} {r['status']}: {r['message']}")
    lines.append(
        f"true Bragg peak at {beamline.crystal.peak_theta:.4f} deg; figures and CXI files in {out}"
    )
    print("\n".join(lines), file=stream if as_json else sys.stdout, flush=True)
    if as_json:
        print(json.dumps(summary), flush=True)
    if linger > 0:
        print(f"IOC {prefix} serving for {linger:g} s (Ctrl-C to stop)", file=stream, flush=True)
        try:
            time.sleep(linger)
        except KeyboardInterrupt:
            pass
    cb.close()
    ioc.close()
    return summary
