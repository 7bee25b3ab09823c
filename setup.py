"""Package discovery for securefml: every subpackage of the four source folders, found, not listed.

``protocols/``, ``defenses/`` and ``attacks/`` stay at the top of the checkout (the design card's
layout) and install inside the ``securefml`` namespace, so users write
``from securefml.protocols import SecAggPlus`` and nothing generic lands in site-packages.
``find_packages`` walks each folder, so a new subpackage (``securefml/bayes/``, ...) lands in the
wheel without editing this file; ``tests/test_packaging.py`` checks the wheel against the tree.
All other metadata lives in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

#: import name -> folder in the checkout
PACKAGE_DIRS = {
    "securefml": "securefml",
    "securefml.protocols": "protocols",
    "securefml.defenses": "defenses",
    "securefml.attacks": "attacks",
}


def _discover() -> list[str]:
    found: list[str] = []
    for name, folder in PACKAGE_DIRS.items():
        found.append(name)
        found.extend(f"{name}.{sub}" for sub in find_packages(folder))
    return sorted(set(found))


setup(packages=_discover(), package_dir=PACKAGE_DIRS)
