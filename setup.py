"""The package layout; the metadata is in pyproject.toml.

The presets and architecture files live at the top of the repository in ``configs/`` (one copy, edited there);
the wheel installs them as the data package ``distlin.configs``, where ``distlin.presets`` finds them.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["distlin*"]), "distlin.configs"],
    package_dir={"distlin.configs": "configs"},
    package_data={
        "distlin": ["models/vocab/*", "app/viewer/*"],
        "distlin.configs": ["*.yaml", "architectures/*.json"],
    },
)
