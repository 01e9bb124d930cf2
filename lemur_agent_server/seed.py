"""The embedded default: on first start the zoo receives our reference models (code only).

Why code only: numbers in the zoo come from our evaluator, never from us. `lemur-agent-server
evaluate-seeds` trains them on a dataset so the zoo gets real runs.
"""

from __future__ import annotations

import logging

from lemur_agent_server.reference_models import REFERENCE_MODELS, read_code
from zoo.records import Model
from zoo.store import ZooStore

log = logging.getLogger(__name__)
SEED_KEY = "seeded_reference_models"


async def seed_reference_models(store: ZooStore) -> int:
    """Add every reference model not yet in the zoo. Returns how many were added. Idempotent."""
    added = 0
    for name in REFERENCE_MODELS:
        _, created = await store.add_model(Model(name=name, code=read_code(name), origin="seed", prefix=None))
        added += int(created)
    if added:
        log.info("seeded %d reference models into %s", added, store.path)
    return added
