"""Serving: encode a request once, score thousands of candidates in chunks, export it (issue 12).

* ``scorer.Scorer``: the live scorer of any registered model, from a workdir or from
  ``(graphdef, params, schema)``; request batches and candidate chunks of static bucket sizes
  (``buckets.Buckets``), per-request errors (``requests.RequestError``), user-state reuse
  (``user_cache.UserStateCache``).
* ``export.export_workdir`` / ``export.export_scorer``: ``jax.export`` artifacts + params + item table +
  manifest.json; ``loader.load`` serves them without the model's Python code.

This file imports nothing, so ``from gesr_jax.serving.loader import load`` stays free of ``gesr_jax.models``
and flax; import each name from its module.
"""
