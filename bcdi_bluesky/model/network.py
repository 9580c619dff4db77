"""The 3D CNN (torch; training and export only): network input -> normalised crystal parameters."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..physics import CrystalModel
from .config import check_zoom


def _mirror(x: torch.Tensor, axes) -> torch.Tensor:
    """Mirror spatial axes ``axes`` (0 = z) of ``(B, C, N, N, N)`` about index ``N // 2``
    (index ``i -> (N - i) mod N``, as :func:`bcdi_bluesky.physics.mirror`)."""
    dims = tuple(2 + a for a in axes)
    return torch.roll(torch.flip(x, dims), shifts=(1,) * len(dims), dims=dims) if dims else x


def _block(c_in: int, c_out: int) -> nn.Sequential:
    """Stride-2 downsampling conv followed by a same-size conv, each with BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv3d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm3d(c_out),
        nn.ReLU(inplace=True),
    )


class CrystalCNN(nn.Module):
    """Encoder of four stride-2 stages (64^3 -> 4^3) and a dense head.

    The head sees the flattened 4^3 feature map, not a global pool: the orientation of the
    crystal is in *where* the streaks are, which pooling would throw away. The output goes
    through ``tanh`` for the first ``n_bounded`` outputs (parameters, inside their normalised
    bounds [-1, 1]) and is linear for the rest (the twin-invariant matrix entries, see
    :mod:`bcdi_bluesky.model.encoding`).

    Parameters
    ----------
    n_params : int
        Number of outputs.
    grid : int
        Input size ``N`` (a multiple of 16).
    width : int
        Channels of the first stage (doubling at each stage).
    hidden : int
        Units of the dense layer.
    n_bounded : int, optional
        Outputs passed through ``tanh`` (default: all).
    friedel : bool
        Add a second input channel ``I(q) - I(-q)``, computed inside the network (the model
        still takes one channel). The intensity is centrosymmetric unless the crystal's odd
        shape and its even-degree phase field occur together, so this channel carries, at first
        order, the twin-odd parameters that the plain intensity shows only at second order;
        a convolution cannot compare ``q`` with ``-q`` on its own (they are far apart).
    zoom : int
        Edge of a centred crop seen by a second encoder at full resolution (0: none; a
        multiple of 8). The crystal's ``l = 3`` asymmetry fills the first minima of the
        fringes (``q R`` about 4.5, 3 to 7 voxels from the peak for the prior's sizes), which
        the main encoder's first stride-2 convolution blurs away.
    """

    def __init__(
        self,
        n_params: int,
        grid: int = 64,
        width: int = 16,
        hidden: int = 256,
        n_bounded: int | None = None,
        friedel: bool = False,
        zoom: int = 0,
    ):
        super().__init__()
        if grid % 16:
            raise ValueError(f"grid must be a multiple of 16, got {grid}")
        check_zoom(zoom, grid)
        self.n_bounded = n_params if n_bounded is None else int(n_bounded)
        self.friedel = bool(friedel)
        self.zoom = int(zoom)
        self.config = {
            "n_params": n_params,
            "grid": grid,
            "width": width,
            "hidden": hidden,
            "n_bounded": self.n_bounded,
            "friedel": self.friedel,
            "zoom": self.zoom,
        }
        w = width
        channels = 2 if friedel else 1
        self.encoder = nn.Sequential(
            nn.Conv3d(channels, w, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm3d(w),
            nn.ReLU(inplace=True),
            _block(w, 2 * w),
            _block(2 * w, 4 * w),
            _block(4 * w, 8 * w),
        )
        flat = 8 * w * (grid // 16) ** 3
        if self.zoom:
            self.zoom_encoder = nn.Sequential(
                nn.Conv3d(channels, w, 3, padding=1, bias=False),
                nn.BatchNorm3d(w),
                nn.ReLU(inplace=True),
                _block(w, 2 * w),
                _block(2 * w, 4 * w),
                _block(4 * w, 4 * w),
            )
            flat += 4 * w * (self.zoom // 8) ** 3
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(flat, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, n_params),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, N, N, N)`` inputs -> ``(B, n_params)`` outputs."""
        if self.friedel:
            # I(-q): point reflection about the peak at index N // 2.
            x = torch.cat([x, x - _mirror(x, (0, 1, 2))], dim=1)
        features = self.encoder(x).flatten(1)
        if self.zoom:
            lo = x.shape[-1] // 2 - self.zoom // 2
            hi = lo + self.zoom
            crop = x[:, :, lo:hi, lo:hi, lo:hi]
            features = torch.cat([features, self.zoom_encoder(crop).flatten(1)], dim=1)
        y = self.head(features)
        k = self.n_bounded
        return torch.cat([torch.tanh(y[:, :k]), y[:, k:]], dim=1)


#: The 8 mirrors of the grid as ``(permutation, flips)`` (see :func:`physics.cube_symmetry`).
MIRRORS = tuple(((0, 1, 2), tuple(a for a in range(3) if code >> a & 1)) for code in range(8))
#: The identity and the half turns about the three axes (pairs of mirrors): a subgroup of
#: :data:`MIRRORS` with half its cost and nearly all its gain (median IoU on 128 validation
#: crystals: bare 0.792, half turns 0.797, all mirrors 0.798).
HALF_TURNS = tuple(g for g in MIRRORS if len(g[1]) % 2 == 0)
#: The identity and the half turn about y (z and x mirrored): the half turn whose pair with
#: the identity gains most (median IoU on 128 validation crystals of the packaged network:
#: bare 0.794, about z 0.797, about x 0.801, about y 0.803, all half turns 0.804).
HALF_TURN_Y = (MIRRORS[0], ((0, 1, 2), (0, 2)))
#: Symmetry averages that :func:`bcdi_bluesky.model.export.export` offers, by name.
SYMMETRY_GROUPS = {
    "none": (),
    "half_turn_y": HALF_TURN_Y,
    "half_turns": HALF_TURNS,
    "mirrors": MIRRORS,
}


class SymmetryAverage(nn.Module):
    """A network averaged over symmetries of the cube (what the exported model computes).

    The priors are invariant under the grid's mirrors, so the network's prediction for a
    mirrored measurement, mapped back to the original frame, is another estimate of the same
    crystal. The mean of the encoded outputs over the group is a prediction with less noise
    (a matrix encoding averages exactly: its blocks transform as ``A M A^T``, linearly).

    Parameters
    ----------
    net : CrystalCNN
        The trained network.
    encoding : TwinInvariantEncoding
        Its output encoding (one with ``symmetry_map``).
    symmetries : sequence of (permutation, flips)
        Group elements, as :func:`bcdi_bluesky.physics.cube_symmetry` takes them.
    """

    def __init__(self, net: nn.Module, encoding, symmetries=MIRRORS):
        super().__init__()
        self.net = net
        self.symmetries = [(tuple(p), tuple(f)) for p, f in symmetries]
        model = encoding.model
        # The prediction for view g estimates encode(A_g p); A_g^T maps it back.
        unmaps = [encoding.symmetry_map(model.symmetry_matrix(p, f).T) for p, f in self.symmetries]
        self.register_buffer("unmaps", torch.tensor(np.array(unmaps), dtype=torch.float32))
        self.config = {**getattr(net, "config", {}), "symmetry_average": len(self.symmetries)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, N, N, N)`` inputs -> ``(B, K)`` mean encoded outputs."""
        views = torch.cat(
            [_mirror(x, f).permute(0, 1, *(2 + a for a in p)) for p, f in self.symmetries], dim=0
        )
        y = self.net(views).reshape(len(self.symmetries), x.shape[0], -1)
        return torch.einsum("gbk,gjk->bj", y, self.unmaps) / len(self.symmetries)


def parameter_weights(model: CrystalModel) -> np.ndarray:
    """Loss weight of each parameter: the support (size, low-order shape) counts most.

    The ``l = 3`` asymmetry weighs as much as ``l = 2``: with it left at zero, the true
    parameters give a median support IoU of only 0.76 on prior crystals.
    """
    w = np.ones(model.size)
    s = model.slices
    w[s["radius"]] = 6.0
    w[s["sh"]] = np.where(model.sh_degrees <= 3, 3.0, 1.0)
    w[s["rbf_centre"]] = 0.3
    w[s["rbf_amplitude"]] = 0.6
    w[s["rbf_width"]] = 0.3
    w[s["phase"]] = 0.6
    return w / w.mean()


class WeightedMSE(nn.Module):
    """Sum of weighted squared errors over the outputs, averaged over the batch.

    With the twin-invariant encoding as targets this loss is twin-invariant by construction;
    with plain parameters (``twin_signs`` given) it takes, per sample, the minimum of the loss
    against the target and against its twin.
    """

    def __init__(self, weights: np.ndarray, twin_signs: np.ndarray | None = None):
        super().__init__()
        w = np.asarray(weights, dtype=np.float64)
        self.register_buffer("weights", torch.tensor(w / w.sum() * 64.0, dtype=torch.float32))
        self.twin_min = twin_signs is not None
        signs = np.ones_like(w) if twin_signs is None else np.array(twin_signs)
        self.register_buffer("signs", torch.tensor(signs, dtype=torch.float32))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Batch mean of ``sum_k w_k (pred_k - target_k)^2`` (minimum over twins if asked)."""
        loss = ((pred - target) ** 2 * self.weights).sum(dim=1)
        if self.twin_min:
            twin = ((pred - target * self.signs) ** 2 * self.weights).sum(dim=1)
            loss = torch.minimum(loss, twin)
        return loss.mean()
