"""sleepzoo-xformers: the ``attention`` back end ``xformers`` (:mod:`sleepzoo_xformers.attention`).

This file imports nothing, so listing sleepzoo's plugins never imports xformers.
"""

__version__ = "0.1.0"
