"""The strain of APS scan 54 as ParaView shows it: rendered offscreen with vtk from the .vti file
the CLI writes.

    python benchmarks/scan54_strain_figure.py [--output docs/img/scan54_strain.png]

Reconstructs the shipped 64^3 crop with its geometry, writes ``scan54.vti`` in a temporary
folder, reads it back with vtk's XML reader, and renders two views side by side: the support's
surface (amplitude at the support threshold) coloured by the strain along Q, and the strain in
the plane through the crystal's centre normal to Q. Axes in nm, lab frame (x, y up, z along the
beam). Needs the ``vtk`` extra.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import scipy.ndimage

from bcdi_bluesky.io import read_geometry, read_intensity, write_result
from bcdi_bluesky.pipeline import Reconstructor

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


def render(
    vti: Path,
    q_unit: np.ndarray,
    threshold: float,
    output: Path,
    size: tuple[int, int] = (1200, 560),
) -> None:
    """Render the two views of ``vti`` to a PNG."""
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the offscreen backend)
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonCore import vtkLookupTable
    from vtkmodules.vtkCommonDataModel import vtkPlane
    from vtkmodules.vtkFiltersCore import vtkCutter, vtkFlyingEdges3D, vtkThreshold
    from vtkmodules.vtkIOImage import vtkPNGWriter
    from vtkmodules.vtkIOXML import vtkXMLImageDataReader
    from vtkmodules.vtkRenderingAnnotation import vtkCubeAxesActor, vtkScalarBarActor
    from vtkmodules.vtkRenderingCore import (
        vtkActor,
        vtkPolyDataMapper,
        vtkRenderer,
        vtkRenderWindow,
        vtkTextActor,
        vtkWindowToImageFilter,
    )

    reader = vtkXMLImageDataReader()
    reader.SetFileName(str(vti))
    reader.Update()
    image = reader.GetOutput()
    points = image.GetPointData()
    amplitude = points.GetArray("amplitude")
    dims = image.GetDimensions()
    values = vtk_to_numpy(points.GetArray("strain")).reshape(dims, order="F")
    limit = float(np.nanpercentile(np.abs(values), 98))
    # The surface lies at the support's edge, where interpolation meets the NaN outside: for
    # its colour only, extend the strain from the nearest support voxel.
    nearest = scipy.ndimage.distance_transform_edt(
        np.isnan(values), return_distances=False, return_indices=True
    )
    filled = numpy_to_vtk(np.ravel(values[tuple(nearest)], order="F").copy(), deep=True)
    filled.SetName("strain_filled")
    points.AddArray(filled)
    lut = vtkLookupTable()
    lut.SetHueRange(0.667, 0.0)  # blue (compressed) to red (stretched)
    lut.SetTableRange(-limit, limit)
    lut.SetNanColor(1.0, 1.0, 1.0, 1.0)
    lut.Build()

    surface = vtkFlyingEdges3D()
    surface.SetInputData(image)
    points.SetActiveScalars("amplitude")
    surface.SetValue(0, threshold * amplitude.GetRange()[1])
    surface.InterpolateAttributesOn()
    surface.ComputeNormalsOn()
    surface.Update()
    surface.GetOutput().GetPointData().SetActiveScalars("strain_filled")

    centre = np.array(image.GetCenter())
    plane = vtkPlane()
    plane.SetOrigin(*centre)
    plane.SetNormal(*q_unit)
    # Only the crystal: the support's voxels, then the plane through them.
    inside = vtkThreshold()
    inside.SetInputData(image)
    inside.SetInputArrayToProcess(0, 0, 0, 0, "support")  # point data
    inside.SetUpperThreshold(0.5)  # with THRESHOLD_UPPER: keep support >= 0.5
    inside.SetThresholdFunction(vtkThreshold.THRESHOLD_UPPER)
    inside.SetAllScalars(True)
    cut = vtkCutter()
    cut.SetInputConnection(inside.GetOutputPort())
    cut.SetCutFunction(plane)
    cut.Update()

    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    for k, (source, array, title) in enumerate(
        (
            (surface.GetOutput(), "strain_filled", "support surface, coloured by strain along Q"),
            (cut.GetOutput(), "strain", "strain along Q, plane through the centre normal to Q"),
        )
    ):
        mapper = vtkPolyDataMapper()
        mapper.SetInputData(source)
        mapper.SetLookupTable(lut)
        mapper.SetScalarRange(-limit, limit)
        mapper.SetScalarModeToUsePointFieldData()
        mapper.SelectColorArray(array)
        mapper.ScalarVisibilityOn()
        actor = vtkActor()
        actor.SetMapper(mapper)
        renderer = vtkRenderer()
        renderer.SetViewport(k * 0.5, 0.0, (k + 1) * 0.5, 1.0)
        renderer.SetBackground(1.0, 1.0, 1.0)
        renderer.AddActor(actor)
        axes = vtkCubeAxesActor()
        axes.SetBounds(surface.GetOutput().GetBounds())
        axes.SetCamera(renderer.GetActiveCamera())
        axes.SetFlyModeToOuterEdges()
        axes.SetXTitle("x (nm)")
        axes.SetYTitle("y (nm)")
        axes.SetZTitle("z (nm)")
        for i in range(3):
            axes.GetTitleTextProperty(i).SetColor(0.1, 0.1, 0.1)
            axes.GetLabelTextProperty(i).SetColor(0.1, 0.1, 0.1)
        axes.GetXAxesLinesProperty().SetColor(0.3, 0.3, 0.3)
        axes.GetYAxesLinesProperty().SetColor(0.3, 0.3, 0.3)
        axes.GetZAxesLinesProperty().SetColor(0.3, 0.3, 0.3)
        renderer.AddActor(axes)
        text = vtkTextActor()
        text.SetInput(title)
        text.GetTextProperty().SetColor(0.1, 0.1, 0.1)
        text.GetTextProperty().SetFontSize(16)
        text.SetPosition(10, size[1] - 30)
        renderer.AddViewProp(text)
        if k == 1:
            bar = vtkScalarBarActor()
            bar.SetLookupTable(lut)
            bar.SetTitle("strain")
            bar.SetNumberOfLabels(5)
            bar.SetLabelFormat("%.1e")
            bar.GetTitleTextProperty().SetColor(0.1, 0.1, 0.1)
            bar.GetLabelTextProperty().SetColor(0.1, 0.1, 0.1)
            bar.SetWidth(0.12)
            bar.SetHeight(0.7)
            bar.SetPosition(0.86, 0.12)
            renderer.AddViewProp(bar)
        camera = renderer.GetActiveCamera()
        camera.SetPosition(*(centre + 2500 * np.array([0.55, 0.45, 0.70])))
        camera.SetFocalPoint(*centre)
        camera.SetViewUp(0.0, 1.0, 0.0)
        renderer.ResetCamera()
        camera.Zoom(0.95)
        window.AddRenderer(renderer)
    window.Render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    writer = vtkPNGWriter()
    output.parent.mkdir(parents=True, exist_ok=True)
    writer.SetFileName(str(output))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "img" / "scan54_strain.png")
    args = parser.parse_args(argv)
    data, mask = read_intensity(DATA / "S0054_intensity_64.npy")
    geometry = read_geometry(DATA / "S0054_geometry.json")
    rec = Reconstructor()
    result = rec.reconstruct(data, mask, geometry=geometry)
    figures = result.summary()
    print(
        {
            k: figures[k]
            for k in (
                "chi",
                "crystal_volume_nm3",
                "crystal_extents_nm",
                "strain_rms",
                "displacement_rms_nm",
            )
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        vti = write_result(result, Path(tmp) / "scan54.vti")
        render(vti, result.physical.q_unit, rec.settings.support_threshold, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
