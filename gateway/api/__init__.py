"""Front APIs: thin translations of the one pipeline's events into each API's wire format."""
