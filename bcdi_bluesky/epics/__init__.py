"""EPICS face: the caproto IOC publishing reconstructions as PVs."""

from .ioc import (
    QUALITY,
    STATUS,
    IOCPublisher,
    IOCServer,
    IOCStartError,
    ReconstructionIOC,
    WriteAccess,
    check_pv_prefix,
    loopback_environment,
    pv_table,
    result_values,
    screen_images,
    summary_values,
)

__all__ = [
    "QUALITY",
    "STATUS",
    "IOCPublisher",
    "IOCServer",
    "IOCStartError",
    "ReconstructionIOC",
    "WriteAccess",
    "check_pv_prefix",
    "loopback_environment",
    "pv_table",
    "result_values",
    "screen_images",
    "summary_values",
]
