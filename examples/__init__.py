"""Examples for dfpjax (run from the repository root, e.g. ``python -m examples.imagenet.main``)."""
