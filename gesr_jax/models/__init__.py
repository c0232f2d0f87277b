"""Ranking models, one package per family, registered by ``model.kind`` (``registry.py``).

``two_tower/`` (the baseline and GESR's towers), ``gesr/`` (GESR: MoA components and MLPG), ``genrank/``
(GenRank). ``base.py`` is the request/candidate contract every model implements; shared blocks live in
``gesr_jax.layers``. Importing this package needs no JAX.
"""
