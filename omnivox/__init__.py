"""omnivox: a self-hosted, real-time speech-to-speech voice agent server for Qwen-Omni models."""

__version__ = "0.1.0"
