"""edgepipe stage types (one module per stage type)."""
