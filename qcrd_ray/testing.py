"""Helpers shared by the test suite and the benchmarks (no hub here: models are built and trained locally)."""

from __future__ import annotations

from pathlib import Path


def train_tiny_student(path: str | Path, steps: int = 100, train_size: int = 200, seed: int = 0) -> None:
    """A tiny T5 fine-tuned for ``steps`` steps on the synthetic task in both modes (predict: the equation;
    explain: a one-sentence rationale + the equation), so greedy outputs are short and stable; saved in HF format
    like a run's ``model/``."""
    import torch

    from qcrd_ray import student
    from qcrd_ray.config import StudentConfig
    from qcrd_ray.data import prompts, synthetic

    rows = synthetic.make_split("train", train_size=train_size, eval_size=20, seed=seed)
    pairs = []
    for r in rows:
        pairs.append((prompts.student_input("predict", r["input"]), r["label"]))
        pairs.append((prompts.student_input("explain", r["input"]),
                      prompts.explain_target("We use the numbers in the question.", r["label"])))
    model, tok = student.load_student(StudentConfig(), [t for pair in pairs for t in pair])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only spin against each other
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    try:
        for step in range(steps):
            batch = pairs[(step * 16) % len(pairs):][:16]
            enc = tok([a for a, _ in batch], text_target=[b for _, b in batch], return_tensors="pt", padding=True)
            enc["labels"][enc["labels"] == tok.pad_token_id] = -100
            loss = model(**enc).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    student.save_student(model, tok, path)
