"""The project's promises as YAML contracts whose falsifiers are bound to tests (see README.md)."""
