"""Offline data shipped with the examples (see FASHION_MNIST_LICENSE)."""
