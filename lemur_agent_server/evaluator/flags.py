"""Flags a researcher would raise on a finished job, each with a short why and a next step.

Why: an agent reads `accuracy: 0.10` as a number; a colleague would say "that is chance level, your
optimizer never stepped". The job's trials, their curves, the hyperparameters the search chose and the
time split between training and evaluation hold enough to say that (and three more such remarks) without
running anything again. Every flag is derived from host-side numbers (accuracies the server computed)
or from the runner's own counts, which are hints and are only used to advise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.phase import Trial

CHANCE_MARGIN = 0.02  # accuracy within 2 points of chance counts as chance level
FALL_MIN = 0.05  # test accuracy this far below its peak, at a lower training loss
EDGE_FACTOR = 2.0  # an lr within a factor 2 of its range's end is "at the edge"
EVAL_SHARE = 0.5  # evaluation took more than half of the trials' measured time
LR_RANGE = (1e-5, 1.0)  # LEMUR's lr search range (log-uniform), unless search_space overrides it


def _flag(name: str, why: str, next_step: str) -> dict[str, str]:
    return {"flag": name, "why": why, "next_step": next_step}


def chance_level(accuracy: float | None, chance: float, reached: float, asked: float) -> dict[str, str] | None:
    if accuracy is None or accuracy > chance + CHANCE_MARGIN:
        return None
    short = reached < asked - 1e-9
    return _flag("chance_level", f"test accuracy {accuracy:.3f} after {reached:g} epochs is chance level "
                 f"({chance:.3f} for this dataset): the model learned nothing"
                 + (f" (the budget stopped it at {reached:g} of {asked:g} epochs)" if short else ""),
                 ("give it more time first (time_budget_s; check_model's speed says what an epoch costs); then "
                  if short else "") +
                 "check that learn() calls optimizer.zero_grad(), loss.backward() and optimizer.step() on every "
                 "batch, that the loss gets logits (no softmax before CrossEntropyLoss), and the lr (try prm "
                 "lr=0.01)")


def accuracy_falls_while_loss_falls(trial: Trial) -> dict[str, str] | None:
    """Test accuracy well below its peak while the training loss is lower than at the peak."""
    points = [p for p in trial.points if p.accuracy is not None]
    if len(points) < 2:
        return None
    peak = max(points, key=lambda p: p.accuracy)  # type: ignore[arg-type, return-value]
    last = points[-1]
    if last is peak or peak.loss is None or last.loss is None:
        return None
    if peak.accuracy - last.accuracy < FALL_MIN or last.loss >= peak.loss:  # type: ignore[operator]
        return None
    return _flag("accuracy_falls_while_loss_falls",
                 f"test accuracy fell {peak.accuracy:.2f} -> {last.accuracy:.2f} (epoch {peak.epoch:g} -> "
                 f"{last.epoch:g}) while the training loss fell {peak.loss:.2f} -> {last.loss:.2f}",
                 "check BatchNorm (forward in eval mode must not depend on the batch; tiny batches make its "
                 "running statistics poor) or lower the learning rate; overfitting looks the same: try dropout "
                 "or fewer epochs")


def lr_at_edge(prm: dict[str, Any], fixed: dict[str, Any], space: dict[str, Any]) -> dict[str, str] | None:
    """The search chose an lr next to an end of its range: the best value may lie outside it."""
    lr = prm.get("lr")
    if "lr" in fixed or not isinstance(lr, int | float) or lr <= 0:
        return None
    entry = space.get("lr") or {}
    low, high = float(entry.get("low", LR_RANGE[0])), float(entry.get("high", LR_RANGE[1]))
    if "choices" in entry or not 0 < low < high:
        return None
    end = "upper" if lr * EDGE_FACTOR >= high else "lower" if lr <= low * EDGE_FACTOR else None
    if end is None:
        return None
    bound = high if end == "upper" else low
    wider = (f"{{'low': {low:g}, 'high': {min(1.0, high * 10):g}, 'log': true}}" if end == "upper"
             else f"{{'low': {low / 10:g}, 'high': {high:g}, 'log': true}}")
    return _flag("lr_at_edge", f"the selected lr {lr:.3g} is at the {end} end of its range [{low:g}, {high:g}] "
                 f"(within a factor {EDGE_FACTOR:g} of {bound:g}): the best lr may lie outside it",
                 f"search around it: search_space={{'lr': {wider}}}, or fix prm.lr and compare")


def evaluation_heavy(train_s: float, eval_s: float) -> dict[str, str] | None:
    total = train_s + eval_s
    if total <= 0 or eval_s / total <= EVAL_SHARE:
        return None
    return _flag("evaluation_heavy", f"{eval_s:.1f} s of evaluation next to {train_s:.1f} s of training "
                 f"({eval_s / total:.0%} of the measured time)",
                 "raise eval_every (fewer learning-curve points, e.g. eval_every=epochs) so the budget trains "
                 "instead of evaluating")


def noisy_timing(host: dict[str, Any] | None) -> dict[str, str] | None:
    if not host or not host.get("noisy"):
        return None
    return _flag("noisy_timing", f"the host was busy during the run ({host.get('why')}): durations and "
                 "accuracy_to_time are slower than on an idle host and vary between trials",
                 "compare accuracy_to_time only between jobs run under similar load, or rerun when the "
                 "server is idle (list_jobs(status='active') shows what else runs)")


def job_flags(trials: list[Trial], selected: Trial | None, chance: float, request: Any,
              host: dict[str, Any] | None) -> list[dict[str, str]]:
    """Every flag that applies to a finished job, the most fundamental first."""
    train_s = sum((t.points[-1].duration_ns or 0) / 1e9 for t in trials if t.points)
    eval_s = sum(t.eval_s for t in trials)
    found = [
        chance_level(selected.points[-1].accuracy, chance, selected.points[-1].epoch, request.epochs)
        if selected else None,
        accuracy_falls_while_loss_falls(selected) if selected else None,
        lr_at_edge(selected.prm, request.prm, request.search_space) if selected else None,
        evaluation_heavy(train_s, eval_s),
        noisy_timing(host),
    ]
    return [f for f in found if f is not None]


def timing(trials: list[Trial], host: dict[str, Any] | None) -> dict[str, Any]:
    """Where the job's seconds went: training (duration_ns, warm-up excluded), evaluation passes, warm-up."""
    train_s = sum((t.points[-1].duration_ns or 0) / 1e9 for t in trials if t.points)
    out: dict[str, Any] = {
        "train_s": round(train_s, 3),
        "eval_s": round(sum(t.eval_s for t in trials), 3),
        "warmup_s": round(sum(t.warmup_s for t in trials), 3),
        "host": host,
    }
    if host and host.get("noisy"):
        out["warning"] = f"timings are noisy: {host.get('why')}"
    return out

