"""poller: tells you, reliably and cheaply, when objects in S3 change."""

__version__ = "0.1.0"
