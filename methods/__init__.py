"""Built-in method plugins. Importing this package registers every built-in component.

Every module of the package is imported (sorted by name, subpackages included), so a new method is one
new file, e.g. ``methods/losses/circle.py`` with an ``@register("loss", "circle")`` class: nothing else
changes. ``dmlh list`` shows it, or shows the file as a broken plugin with its import error.
"""

from harness.registry import import_submodules

import_submodules(__name__)
