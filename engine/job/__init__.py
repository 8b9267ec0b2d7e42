"""One job: make its run folder, set up its log, validate its pipeline and run it; used by `run` and by
every job of a sweep (Hydra's launchers), and by `reproduce`."""
