"""asr-gateway: one robust HTTP/SSE front door for speech recognisers."""

from .app import create_app
from .config import Config, load_config
from .engines import Engine, Session, SessionOptions
from .errors import ConfigError, GatewayError
from .events import Done, EngineUpdate, Failed, Progress, Queued, Segment, Transcript, Word
from .jobs import GatewayState

__all__ = [
    "Config",
    "ConfigError",
    "Done",
    "Engine",
    "EngineUpdate",
    "Failed",
    "GatewayError",
    "GatewayState",
    "Progress",
    "Queued",
    "Segment",
    "Session",
    "SessionOptions",
    "Transcript",
    "Word",
    "__version__",
    "create_app",
    "load_config",
]

__version__ = "0.1.0"
