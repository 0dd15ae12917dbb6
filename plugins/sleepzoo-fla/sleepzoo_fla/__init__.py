"""sleepzoo-fla: fla-core's Triton kernels as sleepzoo ``rule`` plugins (:mod:`sleepzoo_fla.rules`).

``fla_gated_delta``, ``fla_delta``, ``fla_gated_linear`` and ``fla_linear`` compute exactly what sleepzoo's
``gated_delta``, ``delta``, ``gated_linear`` and ``linear`` compute; :mod:`sleepzoo_fla.parity` checks it on a
GPU. This file imports nothing, so listing sleepzoo's plugins imports neither this package's modules nor fla.
"""

__version__ = "0.1.0"
