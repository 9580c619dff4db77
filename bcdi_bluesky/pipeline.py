"""The reconstruction pipeline: preprocess -> CNN -> extremum seeking -> phase-retrieval polish.

It knows nothing of Bluesky or EPICS: arrays in, a :class:`ReconstructionResult` out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft

from .model.latent import latent_vector
from .model.runtime import OnnxCrystalModel
from .physics import CrystalModel, check_mask, check_volume, intensity
from .preprocess import Prepared, fit_to_grid, network_input, remove_hot_pixels
from .settings import ReconstructionSettings
from .tuning.phase_retrieval import seeded_polish
from .tuning.refine import ChiCost, best_start, best_twin_variant, fit_odd_shape, refine_crystal

REFINE_MODES = ("none", "es", "full")

#: ``progress(stage, info)``: called after each stage ("preprocess", "inference", "refine",
#: "polish", "done") and during ES ("es_step") and polish ("polish_step").
ProgressHook = Callable[[str, dict[str, Any]], None]


@dataclass
class ReconstructionResult:
    """A reconstruction on the input grid, in the input's convention.

    ``|fftshift(fftn(object))|^2`` approximates the input intensity (up to scale).
    """

    object: np.ndarray
    support: np.ndarray
    params: np.ndarray
    chi: float
    timings: dict[str, float]
    provider: str
    model_name: str
    crystal_model: CrystalModel
    #: chi after each stage: "cnn", "shape" (the odd-shape search), "es" (model level, on the
    #: model grid) and "polish" (the final object against the input).
    stage_chi: dict[str, float] = field(default_factory=dict)
    #: Refinement costs step by step: the search's best-so-far, then the ES runs.
    es_costs: list[float] = field(default_factory=list)
    polish_errors: list[float] = field(default_factory=list)
    #: Which polish run gave the object: "ER" or "ER/HIO" ("" without a polish).
    polish_recipe: str = ""
    refine: str = "full"
    shift: tuple[int, int, int] = (0, 0, 0)
    #: Position of the CNN's latent on the model card's 2D map, its calibrated distance to the
    #: training distribution (99% of prior crystals below 1), and the flag (distance > 1).
    latent_xy: tuple[float, float] | None = None
    latent_distance: float | None = None
    out_of_distribution: bool = False
    #: The settings the reconstruction ran with.
    settings: ReconstructionSettings = field(default_factory=ReconstructionSettings)
    #: Set by the beamline layer (scan uid and id, recommendation for the next scan...).
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def params_structured(self) -> dict:
        """A readable view of :attr:`params` (radius, SH by degree, RBFs, phase terms)."""
        return self.crystal_model.structured(self.params)

    @property
    def chi_cnn(self) -> float:
        """chi of the CNN's estimate alone (on the model grid)."""
        return self.stage_chi.get("cnn", float("nan"))

    def summary(self) -> dict[str, Any]:
        """JSON-able figures of the run."""
        return {
            "chi": self.chi,
            "stage_chi": self.stage_chi,
            "timings_s": self.timings,
            "provider": self.provider,
            "model": self.model_name,
            "refine": self.refine,
            "es_iterations": len(self.es_costs),
            "polish_iterations": len(self.polish_errors),
            "polish_recipe": self.polish_recipe,
            "support_voxels": int(self.support.sum()),
            "shape": list(self.object.shape),
            "latent_xy": list(self.latent_xy) if self.latent_xy is not None else None,
            "latent_distance": self.latent_distance,
            "out_of_distribution": self.out_of_distribution,
            "settings": self.settings.as_dict(),
        }


def to_input_grid(obj: np.ndarray, prepared: Prepared, shape: tuple[int, ...]) -> np.ndarray:
    """Carry an object from the model grid to the input grid.

    The model grid's far field is the input's, rolled by ``prepared.shift`` and cropped at
    ``prepared.crop``: putting it back where it came from (zeros elsewhere) and transforming
    back gives the object on the input grid (Fourier interpolation when the grids differ).
    """
    n = obj.shape[0]
    field_model = scipy.fft.fftshift(scipy.fft.fftn(obj))
    field_input = np.zeros(shape, dtype=np.complex64)
    src, dst = [], []
    for size, start, shift in zip(shape, prepared.crop, prepared.shift, strict=True):
        j = np.arange(n)
        rolled = start + j  # index in the rolled input
        keep = (rolled >= 0) & (rolled < size)
        src.append(j[keep])
        dst.append((rolled[keep] - shift) % size)
    field_input[np.ix_(*dst)] = field_model[np.ix_(*src)]
    out = scipy.fft.ifftn(scipy.fft.ifftshift(field_input)) * (np.prod(shape) / n**3)
    return out.astype(np.complex64)


def to_model_grid(obj: np.ndarray, n: int) -> np.ndarray:
    """The object's far field cropped to the central ``n^3`` of q, back in real space: a
    reconstruction on a larger input grid brought to a model crystal's grid (comparisons)."""
    field_input = scipy.fft.fftshift(scipy.fft.fftn(obj))
    s = [x // 2 - n // 2 for x in field_input.shape]
    crop = field_input[s[0]:s[0] + n, s[1]:s[1] + n, s[2]:s[2] + n]
    return scipy.fft.ifftn(scipy.fft.ifftshift(crop)).astype(np.complex64)


class Reconstructor:
    """Turns a measured diffraction volume into a 3D crystal, in seconds.

    Parameters
    ----------
    model_path : path-like, optional
        ONNX model (card beside it). Default: the packaged model.
    providers : sequence of str, optional
        ONNX Runtime providers in order of preference (default TensorRT -> CUDA -> CPU).
    threads : int, optional
        ONNX Runtime CPU threads.
    settings : ReconstructionSettings, optional
        How much work each reconstruction may do (default: ``ReconstructionSettings()``).
    **overrides
        Settings fields to change from ``settings`` (``Reconstructor(es_time_budget_s=20)``).

    Raises
    ------
    SettingsError
        An unknown setting or a value outside its limits.
    ModelError
        The model or its card cannot be loaded.
    """

    def __init__(self, model_path=None, providers=None, threads: int | None = None, *,
                 settings: ReconstructionSettings | None = None, **overrides: Any) -> None:
        self.settings = (settings or ReconstructionSettings()).replace(**overrides)
        self.runtime = OnnxCrystalModel(model_path, providers=providers, threads=threads)
        self.model = self.runtime.crystal_model
        self.previous_params: np.ndarray | None = None

    @property
    def provider(self) -> str:
        """The ONNX Runtime provider that really runs."""
        return self.runtime.provider

    @property
    def model_name(self) -> str:
        """Name of the CNN (from its card)."""
        return self.runtime.name

    def reconstruct(self, intensity_: np.ndarray, mask: np.ndarray | None = None,
                    refine: str = "full", progress: ProgressHook | None = None,
                    initial_params: np.ndarray | None = None,
                    settings: ReconstructionSettings | None = None) -> ReconstructionResult:
        """Reconstruct a crystal from a diffraction volume.

        Parameters
        ----------
        intensity_ : array_like
            3D intensity (photon counts or corrected intensities), any shape, centred or not.
        mask : array_like of bool, optional
            True for valid voxels (detector gaps, beamstop and hot pixels False).
        refine : {"none", "es", "full"}
            CNN only; CNN + extremum seeking; CNN + ES + phase-retrieval polish.
        progress : callable, optional
            ``progress(stage, info)`` hook (see :data:`ProgressHook`).
        initial_params : ndarray, optional
            Start ES from these physical parameters instead of (or, in tracking mode, besides)
            the CNN's estimate.
        settings : ReconstructionSettings, optional
            Settings for this call only (default: :attr:`settings`); the result carries them.

        Raises
        ------
        ValueError
            Wrong rank, NaN/inf, negative values, an empty volume, a mask of the wrong shape,
            or an unknown ``refine``.
        """
        if refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
        if settings is None:
            settings = self.settings
        notify = progress or (lambda stage, info: None)
        t0 = time.perf_counter()
        timings = {"preprocess": 0.0, "inference": 0.0, "refine": 0.0, "polish": 0.0}

        data = check_volume(intensity_)
        valid = check_mask(mask, data.shape)
        valid = remove_hot_pixels(data, valid)
        if valid.all():
            valid = None
        prepared = fit_to_grid(data, self.model.n, valid)
        x = network_input(prepared.intensity, prepared.mask)
        timings["preprocess"] = time.perf_counter() - t0
        notify("preprocess", {"seconds": timings["preprocess"], "shift": prepared.shift})

        t = time.perf_counter()
        predicted = self.runtime.predict(x).astype(np.float64)
        chi_of = ChiCost(prepared.intensity, prepared.mask)
        latent, cnn_chi = best_twin_variant(
            self.model, self.runtime.encoding.twin_variants(predicted), chi_of)
        params = self.model.denormalise(latent)
        timings["inference"] = time.perf_counter() - t
        stage_chi = {"cnn": cnn_chi}
        latent_map = self.runtime.latent_map
        latent_xy, distance, ood = None, None, False
        if latent_map is not None:
            z = latent_vector(latent, stage_chi["cnn"])
            latent_xy = tuple(float(v) for v in latent_map.project(z))
            distance = float(latent_map.distance(z))
            ood = distance > 1.0
        # Out of the CNN's depth: lean on the model-free refinement (twice the ES budget).
        es_scale = 2 if ood else 1
        message = (f"CNN out of distribution (latent distance {distance:.2f} > 1): doubling "
                   "the extremum-seeking budget" if ood else "")
        notify("inference", {"seconds": timings["inference"], "chi": stage_chi["cnn"],
                             "params": params, "latent_distance": distance,
                             "out_of_distribution": ood, "message": message})

        starts = [params]
        if initial_params is not None:
            starts.append(self.model.clip(np.asarray(initial_params, dtype=np.float64)))
        if settings.track and self.previous_params is not None:
            starts.append(self.previous_params)
        if len(starts) > 1:
            params = starts[best_start(self.model, starts, chi_of)[0]]

        es_costs: list[float] = []
        if refine in ("es", "full"):
            t = time.perf_counter()

            budget = settings.es_time_budget_s * es_scale
            steps_before = 0

            def es_hook(iteration: int, cost: float) -> None:
                if (steps_before + iteration) % 10 == 0:
                    notify("es_step", {"iteration": steps_before + iteration, "cost": cost})

            searched = fit_odd_shape(
                self.model, params, prepared.intensity, prepared.mask,
                max_evaluations=settings.shape_search_evaluations * es_scale,
                time_budget_s=budget, hook=es_hook)
            steps_before = searched.iterations
            stage_chi["shape"] = searched.chi
            # The search's answer is a second start for ES, not a replacement of the CNN's:
            # on crystals outside the model family it can lead ES to a poorer fit.
            refined = refine_crystal(
                self.model, params, prepared.intensity, prepared.mask,
                alternatives=[searched.params] if searched.chi < searched.chi_start else [],
                coarse_iterations=settings.es_coarse_iterations * es_scale,
                fine_iterations=settings.es_fine_iterations * es_scale,
                time_budget_s=max(budget - searched.seconds, 0.0),
                seed=settings.seed, hook=es_hook)
            params, es_costs = refined.params, searched.costs + refined.costs
            stage_chi["es"] = refined.chi
            timings["refine"] = time.perf_counter() - t
            notify("refine", {"seconds": timings["refine"], "chi": refined.chi,
                              "params": params})
        self.previous_params = params

        model_object = self.model.voxelise(params)
        obj = to_input_grid(model_object, prepared, data.shape)
        polish_errors: list[float] = []
        polish_recipe = ""
        final_chi = None
        polishes = settings.polish_er_iterations > 0 or settings.polish_iterations > 0
        if refine == "full" and polishes:
            t = time.perf_counter()
            seed_support = np.abs(obj) > 0.1 * np.abs(obj).max()
            polished = seeded_polish(
                data, obj, seed_support, valid, er_iterations=settings.polish_er_iterations,
                iterations=settings.polish_iterations, hio_fraction=settings.polish_hio_fraction,
                time_budget_s=settings.polish_time_budget_s,
                hook=lambda i, e: notify("polish_step", {"iteration": i, "error": e})
                if i % 10 == 0 else None)
            obj, polish_errors = polished.object, polished.errors
            polish_recipe, final_chi = polished.recipe, polished.chi  # chi of obj vs the data
            timings["polish"] = time.perf_counter() - t
            notify("polish", {"seconds": timings["polish"], "recipe": polished.recipe})

        amp = np.abs(obj)
        support = amp > settings.support_threshold * amp.max()
        if final_chi is None:
            final_chi = ChiCost(data, valid)(intensity(obj))
        if refine == "full":
            stage_chi["polish"] = final_chi
        timings["total"] = time.perf_counter() - t0
        result = ReconstructionResult(
            object=obj, support=support, params=params, chi=final_chi, timings=timings,
            provider=self.provider, model_name=self.model_name, crystal_model=self.model,
            stage_chi=stage_chi, es_costs=es_costs, polish_errors=polish_errors,
            polish_recipe=polish_recipe,
            refine=refine, shift=prepared.shift, latent_xy=latent_xy,
            latent_distance=distance, out_of_distribution=ood, settings=settings)
        notify("done", {"seconds": timings["total"], "chi": final_chi})
        return result
