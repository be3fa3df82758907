"""Teacher generation: K rationales per question from a teacher backend on Ray Data, split into positives and
negatives by self-consistency (docs/design.md, "The algorithm": positive knowledge).

`pipeline.run_teacher` is the entrypoint; `consistency` and `samples` are pure and need no Ray.
"""
