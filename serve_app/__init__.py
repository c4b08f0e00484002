"""The Ray Serve application: retriever -> memory cache -> live encoder + reranker -> decoder.

Arrives with the serving issue; the reader it serves is `glimmer_ray.model`.
"""
