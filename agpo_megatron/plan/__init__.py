"""Everything decided before a process group or a tensor exists: loading a run's config (generated
inputs resolved, the model's shape checked), preflight of paths, and the per-phase memory planner.
May import bridge/ and below; never imported by bridge/, rollout/, checkpoint/ or anything lower.
"""
