"""edgepipe's built-in configuration. This folder installs as the package `edgepipe_conf` (setup.py)
so that a wheel carries it; Hydra reads it as pkg://edgepipe_conf, behind the user's own conf/."""
