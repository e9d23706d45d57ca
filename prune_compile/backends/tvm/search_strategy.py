"""How MetaSchedule searches one task's candidates for the trials it is given.

MetaSchedule's XGBoost cost model answers with random numbers until it has trained on `COST_MODEL_WARMUP` measured
candidates, and we tune one task per `tune_tasks` call, each with a new model: a task given fewer trials than that
is picked at random whatever the search does. The evolutionary search still breeds its population for four
generations on those random scores (each child a trace replayed and post-processed) and the model extracts features
and trains after every batch: 2.3 s of an 8-trial conv task's ~7 s here, a third of a TVM latency-table entry.
Below the warm-up the population is sampled once and the candidates drawn from it at random (`Unguided`): the same
distribution of measured schedules, without the breeding. The sampled population still keeps measured schedules out
of a batch, which a plain trace replay would not. Budgets the model can learn from keep MetaSchedule's search.
"""

from __future__ import annotations

from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.cost_model import PyCostModel

# MetaSchedule's XGBModel(num_warmup_samples=...) default: measured candidates before its predictions mean anything
COST_MODEL_WARMUP = 100
TRIALS_PER_BATCH = 32


@derived_object
class Unguided(PyCostModel):
    """A cost model that knows nothing: uniform scores from its own seeded generator (MetaSchedule's RandomModel
    reseeds numpy's global one), and nothing to learn."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        super().__init__()
        self.rng = np.random.default_rng(seed)

    def load(self, path: str) -> None:
        """Nothing to load: the model has no state worth keeping."""

    def save(self, path: str) -> None:
        """Nothing to save (see load)."""

    def update(self, context, candidates, results) -> None:
        """Measurements teach it nothing."""

    def predict(self, context, candidates):
        return self.rng.random(len(candidates))


def evolutionary(trials: int):
    """MetaSchedule's evolutionary search with a population sized to the budget: the default (512) costs minutes
    per round on 2 cores."""
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=min(512, max(64, 8 * trials)),
                                                 init_min_unmeasured=min(50, max(16, trials)))


def search_for(trials: int, seed: int) -> tuple[object, object]:
    """(search strategy, cost model) for a task tuned for `trials` in one call."""
    from tvm.s_tir import meta_schedule as ms

    batch = min(trials, TRIALS_PER_BATCH)
    if trials < COST_MODEL_WARMUP:
        strategy = ms.search_strategy.EvolutionarySearch(population_size=max(16, 2 * batch), genetic_num_iters=0,
                                                         init_min_unmeasured=max(16, 2 * batch))
        return strategy, Unguided(seed)
    return evolutionary(trials), "xgb"
