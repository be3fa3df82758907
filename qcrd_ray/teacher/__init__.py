"""Teacher generation: K rationales per question from a teacher backend on Ray Data, split into positives and
negatives by self-consistency (DESIGN.md §1 "Positive knowledge", §2 "Teacher generation").

`pipeline.run_teacher` is the entrypoint; `consistency` and `samples` are pure and need no Ray.
"""
