"""Training and evaluation: ``gesr_jax.train.trainer.train_and_evaluate(config, workdir)`` and
``gesr_jax.train.trainer.evaluate_workdir(workdir)``.

This file imports nothing: ``gesr_jax.config`` imports ``gesr_jax.train.config``, which runs this file
first, and the trainer imports ``gesr_jax.config`` back, so the entry points are imported from
``gesr_jax.train.trainer`` itself.
"""
