"""Model backends: one class per kind of model folder, registered under the ``edgepipe.backends``
entry points (pyproject.toml). ``backends.base`` holds the contract and the registry; each other
module here is one family of backends. See ``backends/base.py``."""
