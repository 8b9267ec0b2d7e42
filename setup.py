"""Everything about the distribution is in pyproject.toml except the package list, which pyproject
cannot express: conf/ stays at the top of the repository and installs as the importable package
`edgepipe_conf` (Hydra finds it as pkg://edgepipe_conf), one subpackage per config group, so a wheel
carries the built-in configuration. New code packages and new config groups are picked up here."""

from setuptools import find_namespace_packages, setup

CODE = find_namespace_packages(include=["engine*", "stages*", "boards*", "backends*"])
CONF = ["edgepipe_conf"] + [f"edgepipe_conf.{group}" for group in find_namespace_packages(where="conf")]

setup(packages=CODE + CONF, package_dir={"edgepipe_conf": "conf"})
