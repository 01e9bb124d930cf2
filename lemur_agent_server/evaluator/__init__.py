"""The evaluator: static checks, sandboxed training jobs, trusted scoring and archiving."""
