"""What stages and boards may import from the engine: the stage contract (stage.py), file digests
(hashing.py), downloads during validation (fetching.py), process locks, Markdown text and the pictures
drawn like the report's. Nothing here imports another engine layer; this package's __init__ imports
nothing, so a decoding worker importing hashing.py loads no pydantic."""
