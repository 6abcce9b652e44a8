"""Where bnet's extension points find their members: by importing a package.

Every module of a built-in package registers what it defines when it is imported (a model
class with ``@register``, a family with ``register_family``), and an installed distribution
adds its own through an entry point group, the way pytest and MLflow find plugins::

    [project.entry-points."bnet.models"]
    my_model = "my_lab.bnet_models"      # a module that registers model classes

Nothing lists the members by hand, so adding one is adding its module.
"""

from __future__ import annotations

import pkgutil
import warnings
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points


def package_modules(package: str) -> list[str]:
    """The full names of a package's modules and subpackages' modules, without importing them."""
    root = import_module(package)
    return [info.name for info in pkgutil.walk_packages(root.__path__, f"{package}.")]


@cache
def load_all(package: str, group: str) -> None:
    """Import every module of ``package`` and every entry point of ``group`` (once)."""
    for name in package_modules(package):
        import_module(name)
    for point in entry_points(group=group):
        load_entry_point(point)


def load_entry_point(point) -> None:
    """Load an installed distribution's extension; one that fails to import is named in a
    warning rather than breaking every command."""
    try:
        point.load()
    except Exception as err:  # a third party's module: any error is its own
        warnings.warn(f"bnet extension '{point.name}' ({point.value}) of group '{point.group}' failed to load: "
                      f"{type(err).__name__}: {err}", stacklevel=2)
