"""EPICS face: the caproto IOC publishing reconstructions as PVs."""

from .ioc import (
    STATUS,
    IOCPublisher,
    IOCServer,
    ReconstructionIOC,
    loopback_environment,
    pv_table,
    result_values,
    screen_images,
)

__all__ = ["STATUS", "IOCPublisher", "IOCServer", "ReconstructionIOC", "loopback_environment",
           "pv_table", "result_values", "screen_images"]
