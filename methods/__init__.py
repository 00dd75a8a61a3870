"""Built-in method plugins. Importing this package registers every built-in component.

The order is fixed so that registration (and `dmlh list`) is deterministic.
"""

from methods import abe, backbones, losses, mdr, miners, pooling, synthesis, whitening  # noqa: F401
