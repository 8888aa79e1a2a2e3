"""fxzip's version, in a module of its own so that any module can record it
(reports, the distributed handshake) without importing the package root."""

__version__ = "0.1.0"
