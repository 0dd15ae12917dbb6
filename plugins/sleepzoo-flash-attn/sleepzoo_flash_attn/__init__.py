"""sleepzoo-flash-attn: the ``attention`` back end ``flash_attn`` (:mod:`sleepzoo_flash_attn.attention`).

This file imports nothing, so listing sleepzoo's plugins never imports flash-attn.
"""

__version__ = "0.1.0"
