"""Where one model stands on its task/dataset/metric: its rank by accuracy and by accuracy-to-time among
every model's score (`zoo.query.SCORE_DEFINITION`, the same numbers leaderboard and query_models(view=
'models') rank by), and its gap to the best model.

Why computed at read time: a finished job's standing changes as other models are trained; reading it from
the zoo when the job is shown keeps it true, and the evaluator pipeline need not know about ranks.
"""

from __future__ import annotations

from typing import Any

from zoo.query import SCORE_ORDER_SQL, Filters, ScoreBy, model_scores_sql
from zoo.store import ZooStore


async def _ranking(store: ZooStore, f: Filters, by: ScoreBy) -> list[dict[str, Any]]:
    scores, args = model_scores_sql(f, by)
    return await store.fetchall(f"SELECT m.name, s.best, s.accuracy FROM {scores} s JOIN model m ON m.id = "
                                f"s.model_id ORDER BY {SCORE_ORDER_SQL}", args)


async def model_standing(store: ZooStore, model_name: str, task: str, dataset: str, metric: str
                         ) -> dict[str, Any] | None:
    """{rank_accuracy, rank_a2t, n, best_name, best_accuracy, accuracy, gap} for `model_name` on the triple,
    or None when the model has no complete run there. `gap` is the model's score minus the best model's
    (0 when it is the best; negative below it)."""
    f = Filters(task=task, dataset=dataset, metric=metric)
    by_acc = await _ranking(store, f, "accuracy")
    names = [r["name"] for r in by_acc]
    if model_name not in names:
        return None
    by_a2t = [r["name"] for r in await _ranking(store, f, "accuracy_to_time")]
    mine = by_acc[names.index(model_name)]
    best = by_acc[0]
    return {"rank_accuracy": names.index(model_name) + 1,
            "rank_a2t": by_a2t.index(model_name) + 1 if model_name in by_a2t else None,
            "n": len(names), "best_name": best["name"], "best_accuracy": best["best"],
            "accuracy": mine["best"], "gap": round(mine["best"] - best["best"], 6),
            "scope": f"{task}/{dataset}/{metric}; score as in leaderboard (best complete run per model)"}
