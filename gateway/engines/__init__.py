"""Engines behind the gateway, all behind one seam: an :class:`Engine` opens a :class:`Session`."""

from __future__ import annotations

from ..config import (
    EngineConfig,
    OpenAIRealtimeConfig,
    PocketSphinxConfig,
    ScriptedConfig,
    WhisperConfig,
    WhisperLiveKitConfig,
)
from .base import PCM_BYTES_PER_SECOND, PCM_SAMPLE_RATE, Engine, Session, SessionOptions

__all__ = [
    "PCM_BYTES_PER_SECOND",
    "PCM_SAMPLE_RATE",
    "Engine",
    "Session",
    "SessionOptions",
    "build_engine",
]


def build_engine(name: str, config: EngineConfig) -> Engine:
    """Instantiate the engine a config section describes (imports only the kinds in use)."""
    if isinstance(config, WhisperConfig):
        from .whisper import WhisperEngine

        return WhisperEngine(name, config)
    if isinstance(config, PocketSphinxConfig):
        from .embedded import PocketSphinxEngine

        return PocketSphinxEngine(name, config)
    if isinstance(config, ScriptedConfig):
        from .scripted import ScriptedEngine

        return ScriptedEngine(name, config)
    if isinstance(config, WhisperLiveKitConfig):
        from .whisperlivekit import WhisperLiveKitEngine

        return WhisperLiveKitEngine(name, config)
    if isinstance(config, OpenAIRealtimeConfig):
        from .openai_realtime import OpenAIRealtimeEngine

        return OpenAIRealtimeEngine(name, config)
    raise TypeError(f"unknown engine config {type(config).__name__}")
