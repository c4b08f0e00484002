"""The GLIMMER Ray Serve application: retriever -> memory cache -> live encoder + reranker -> decoder.

`app.build_app` composes one deployment per stage behind an HTTP ingress (its defaults: `app.AppArgs`
and `app.default_options`); `config.yaml` is its Serve config for `serve deploy` / `serve run`;
`deploy.deploy` deploys it from Python and `deploy.ask` asks it a question. The stages are
`glimmer_ray.serving`'s; the reader they serve is `glimmer_ray.model`.
"""
