"""The Dask worker plugin that loads the model when a worker starts (needs ``distributed``)."""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin

from .scaleout import ReconstructorSpec, warm_reconstructor


class WarmReconstructorPlugin(WorkerPlugin):
    """Dask worker plugin: load the model when a worker starts (or joins later).

    Register it with ``client.register_plugin(WarmReconstructorPlugin(spec))``;
    :func:`dask_executor` does.
    """

    def __init__(self, spec: ReconstructorSpec) -> None:
        self.spec = spec
        # The same name from every client: registering again replaces, never duplicates.
        self.name = f"bcdi-warm-reconstructor:{spec!r}"

    def setup(self, worker: Any) -> None:
        """Build this worker's Reconstructor (idempotent: the cache keeps one per process)."""
        warm_reconstructor(self.spec)
