"""Model comparison: two-tower vs GESR vs GenRank (action-oriented and interleaved), paired over 5 seeds.

Launch (writes experiments/results/models_<dataset>.md):
    python experiments/model_comparison.py --dataset synthetic     # 20 runs; ~10 min more after ablations.py
    python experiments/model_comparison.py --dataset ml1m          # 20 runs; ~30 min more after ablations.py

Rows: the two-tower baseline, GESR with every MoA component (``<preset>``), GenRank with action-oriented
tokens (``<dataset>_genrank``) and its item-action interleaved baseline (``<dataset>_genrank_interleaved``).
The GenRank presets take their data and training sections (model selection included) from the GESR
preset, so every row sees the same requests, candidates, seeds and step budget. The runs share
experiments/ablations.py's folders (``<runs root>/<dataset>``, comparison.default_runs_root): the two-tower and GESR rows trained
there are only re-evaluated here. Columns as in ablations.py: test NE and AUC per task at the best
valid step, the paired relative NE change vs the two-tower and vs GenRank (action-oriented) (mean ± 95% t
CI; "n.s." when it holds 0; the interleaved row's second column is the paper's token-layout comparison),
the best step per seed and the training loop's seconds. Speed per model (train step and serving
latency at N = 50 and 200) is experiments/bench_genrank.py's table.
Expected: experiments/results/models_<dataset>.md.
"""

from __future__ import annotations

import sys

import ablations

from gesr_jax import comparison, config as config_lib

GENRANK_PRESETS = {"synthetic_base": "synthetic_genrank", "ml1m_base": "ml1m_genrank"}


def variants(preset: str, overrides: tuple[str, ...]) -> list[comparison.Variant]:
    genrank = GENRANK_PRESETS[preset]
    return [
        comparison.Variant("two-tower", preset + config_lib.TWO_TOWER_SUFFIX, overrides),
        comparison.Variant("GESR (all on)", preset, overrides),  # the ablation table's row of the same name
        comparison.Variant("GenRank (action-oriented)", genrank, overrides),
        comparison.Variant("GenRank (interleaved)", f"{genrank}_interleaved", overrides),
    ]


def main(argv: list[str] | None = None) -> int:
    args = ablations.parse_args(__doc__.splitlines()[0], "models", argv)
    return ablations.run_and_report(
        args, "model_comparison.py", "Model comparison", "models", variants, also_vs="GenRank (action-oriented)"
    )


if __name__ == "__main__":
    sys.exit(main())
