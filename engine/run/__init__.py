"""Running a validated pipeline: the plan (what is cached, what runs and why), the scheduler of
parallel stages, and the one way a stage is invoked."""
