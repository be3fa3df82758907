"""Helpers shared by the test suite and the benchmarks (no hub here: models are built and trained locally)."""

from __future__ import annotations

from pathlib import Path

# A minimal chat template for a tiny causal student (``student.chat_template``: a Jinja file): every character of it
# is in the tiny tokenizer's alphabet, so a student trained through it reads it like any other text.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def train_tiny_student(path: str | Path, steps: int = 100, train_size: int = 200, seed: int = 0,
                       family: str = "seq2seq", chat_template: str = "auto") -> None:
    """A tiny student of ``family`` (``seq2seq``: T5; ``causal``: a Llama-style decoder) fine-tuned for ``steps``
    steps on the synthetic task in both modes (predict: the equation; explain: a one-sentence rationale + the
    equation), so greedy outputs are short and stable; saved in HF format like a run's ``model/``.
    ``chat_template`` is ``student.chat_template`` (a causal student: ``auto`` = none for the tiny tokenizer, or
    the path of a Jinja file, e.g. :data:`TINY_CHAT_TEMPLATE` written out). Both families train the same way,
    through the family's API: prompts rendered by ``family.prompt``, the token-mean cross-entropy of the target."""
    import torch

    from qcrd_ray import students as student
    from qcrd_ray.config import StudentConfig
    from qcrd_ray.data import prompts, synthetic
    from qcrd_ray.qcrd.losses import sequence_ce

    rows = synthetic.make_split("train", train_size=train_size, eval_size=20, seed=seed)
    pairs = []
    for r in rows:
        pairs.append((prompts.student_input("predict", r["input"]), r["label"]))
        pairs.append((prompts.student_input("explain", r["input"]),
                      prompts.explain_target("We use the numbers in the question.", r["label"])))
    cfg = StudentConfig(family=family, chat_template=chat_template)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: more threads only spin against each other
    torch.manual_seed(seed)
    try:
        model, tok = student.load_student(cfg, [t for pair in pairs for t in pair])
        fam = student.family_of(model)
        rendered = [(fam.prompt(tok, a), b) for a, b in pairs]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for step in range(steps):
            batch = rendered[(step * 16) % len(rendered):][:16]
            ids, mask = fam.encode_prompts(tok, [a for a, _ in batch], cfg.max_input_len)
            labels = fam.encode_targets(tok, [b for _, b in batch], cfg.max_target_len)
            loss = sequence_ce(fam.target_logits(model, ids, mask, labels), labels).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    student.save_student(model, tok, path)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (a server started by a test or benchmark binds it next)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
