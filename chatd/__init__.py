"""chatd: a real-time chat server with an AI assistant."""

__version__ = "0.1.0"
