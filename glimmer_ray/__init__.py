"""glimmer-ray: train and serve GLIMMER late-interaction memory readers on Ray."""

__version__ = "0.1.0"
