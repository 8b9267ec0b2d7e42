"""Code shared by several stages: preprocessing, the model zoo and model bundles."""
