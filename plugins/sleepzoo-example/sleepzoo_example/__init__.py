"""sleepzoo-example: a third-party sleepzoo plugin, and the template for writing one.

It provides, through the entry points in its ``pyproject.toml`` only:

* rule ``hebbian`` (:mod:`sleepzoo_example.hebbian`): plain linear-attention / Hebbian fast weights;
* mixer ``linear_attention`` (:mod:`sleepzoo_example.linear_attention`): a linear-attention layer using it.

This file imports nothing on purpose, so that asking sleepzoo for one name imports only that name's module.
"""

__version__ = "0.1.0"
