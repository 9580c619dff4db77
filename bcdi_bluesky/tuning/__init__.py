"""Adaptive tuning: bounded extremum seeking (generic) and its use on crystal parameters."""

from .extremum_seeking import ESResult, ExtremumSeeker, StepHook

__all__ = ["ESResult", "ExtremumSeeker", "StepHook"]
