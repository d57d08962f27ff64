"""Front APIs: thin translations of the one pipeline's events into each API's wire format.

Each front (native, OpenAI-compatible, AymurAI) supplies its option parser, translator, answer and
error shape to the one endpoint type, :class:`gateway.api.common.Transcribe`. Fronts import
``common``, :mod:`gateway.jobs` and the pipeline; never each other, the app or the auth middleware.
"""

__all__: list[str] = []
