"""Decoded audio for voice agents: Opus, jitter buffer, pacing, endpointing, the app API."""
