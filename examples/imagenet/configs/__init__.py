"""Training configurations: each module has a ``get_config()`` returning a ``Config``."""
