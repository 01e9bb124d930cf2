"""Hostile submissions run end to end through `submit_model` on every sandbox backend.

`submissions` holds the model files (each a full LEMUR `Net` file with one attack in it), `conftest` the
host-side world they attack (canaries, listeners, snapshots, a server per test) and `test_hostile` the
table of cases with the exact outcome each must end in.
"""
