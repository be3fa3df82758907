"""Training-step cost: QCRD vs DSS at equal batch, naive vs optimised QCRD, and QCRD's cost breakdown.

Variants: ``dss``; ``qcrd_naive`` (every candidate through the full student with gradient); ``qcrd`` (the
optimised step of qcrd/step.py); ``qcrd_no_qj`` (optimised, quality judge off: the student's side alone, no D).

Each example has K = 5 teacher samples (4 positives and 1 teacher negative, the usual majority split) and one
student negative, so QCRD sees 6 candidate rationales per example where DSS sees one. Steps are full training
steps (zero_grad, forward, backward, AdamW step), measured round-robin (DSS, naive, optimised, ...) so that load
from other processes on the machine hits every variant alike; the median is reported.

    python benchmarks/train_step.py                 # T5-small shape (60 M parameters), batch 8
    python benchmarks/train_step.py --shape tiny    # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

from qcrd_ray.config import Config
from qcrd_ray.data import prompts
from qcrd_ray.qcrd.discriminator import Discriminator
from qcrd_ray.qcrd.step import DistillModel, make_batch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SHAPES = {
    # t5-small: 60.5 M parameters (32k vocabulary, 6+6 layers, d_model 512, d_ff 2048, 8 heads)
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                  feed_forward_proj="relu"),
    "tiny": dict(vocab_size=800, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu"),
}
WORDS = ("apples oranges baskets students teacher bought sold gave each more than less total remaining left "
         "shelves pages books minutes hours farmer market price dollars tickets children cookies boxes").split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(2, 99)) for _ in range(n_words))


def make_rows(n: int, k: int, q_words: int, r_words: int, seed: int = 0) -> list[dict]:
    """Teacher rows shaped like SVAMP: a question, K samples split 4 positives / 1 negative, one student negative."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = f"( {i + 3} + 4 )", f"( {i + 3} - 4 )"
        rationales = [sentence(rng, r_words) for _ in range(k)]
        samples = [{"index": j, "text": r, "rationale": r, "answer": bad if j == 0 else good, "status": "ok",
                    "error": ""} for j, r in enumerate(rationales)]
        rows.append({
            "id": f"b{i}", "task": "synthetic", "input": sentence(rng, q_words) + " ?", "choices": [], "label": good,
            "positives": rationales[1:], "negatives": rationales[:1], "majority_answer": good, "agreement": 0.8,
            "teacher_correct": True, "samples": samples, "negative_round": 0,
            "student_negatives": [prompts.explain_target(sentence(rng, r_words), bad)],
        })
    return rows


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """One token per word or punctuation mark, so token counts follow the word counts of the synthetic text (the
    student's Unigram tokenizer, trained on this little text, falls back to single characters)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build(shape: str, method: str, cfg: Config, naive: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    student = T5ForConditionalGeneration(T5Config(**SHAPES[shape], tie_word_embeddings=False, pad_token_id=0,
                                                  eos_token_id=1, decoder_start_token_id=0))
    cfg = cfg.replace(train={"method": method})
    disc = Discriminator.from_student(student, cfg.discriminator) if method == "qcrd" else None
    model = DistillModel(student, disc, cfg, naive=naive)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def full_step(model, opt, batch) -> None:
    opt.zero_grad(set_to_none=True)
    model(batch, alpha3=0.5).loss.backward()
    opt.step()


def breakdown_parts(model: DistillModel, batch) -> dict:
    """The optimised QCRD step's parts, each forward + backward on its own (no optimizer step)."""
    from qcrd_ray.qcrd import losses as L

    def label():
        model.label_loss(batch).backward()

    def scoring():
        with torch.no_grad():
            model.score_candidates(batch, model.encode_explain(batch))

    # the selection itself is timed in "scoring"; the same number of candidates gets gradient whatever is chosen
    hidden = model.encode_explain(batch)
    grid = model.to_grid(batch, model.score_candidates(batch, hidden))
    pos, neg = model.to_grid(batch, batch.cand_positive), model.to_grid(batch, ~batch.cand_positive)
    w = sum(L.candidate_weights(grid, mask, "minmax", positive=is_pos) for mask, is_pos in ((pos, True), (neg, False)))
    which = torch.arange(batch.cand_labels.shape[0])[w[batch.cand_example, batch.cand_slot] > 0]

    def selected():
        model.decode_losses(batch, model.encode_explain(batch), which).sum().backward()

    def discriminator():
        s = model.to_grid(batch, model.disc_scores(batch))
        L.discriminator_loss(s, model.to_grid(batch, batch.cand_positive), model.to_grid(batch, ~batch.cand_positive)).backward()

    return {"label task (fwd+bwd)": label, "explain encoder + candidate scoring (no grad)": scoring,
            "explain encoder + selected pos/neg (fwd+bwd)": selected, "discriminator on every pair (fwd+bwd)": discriminator}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (default 8, the per-worker batch)")
    parser.add_argument("--k", type=int, default=5, help="teacher samples per example")
    parser.add_argument("--question-words", type=int, default=45, help="SVAMP-like: ~50 tokens with the prefix")
    parser.add_argument("--rationale-words", type=int, default=50, help="~64 target tokens with the answer")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads oversubscribe "
                             "and a step slows down by an order of magnitude)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = make_rows(args.batch, args.k, args.question_words, args.rationale_words)
    texts = [prompts.student_input(m, r["input"]) for r in rows for m in ("predict", "explain")]
    texts += [t for r in rows for t in r["positives"] + r["negatives"] + r["student_negatives"]] + WORDS
    texts += [f"question: {r['input']} rationale: The answer is" for r in rows]
    tok = word_tokenizer(texts)
    cfg = Config()
    no_qj = cfg.replace(loss={"quality_judge": False})  # the student side alone: no D, s_pos ≡ 1, s_neg ≡ 0
    dss_batch = make_batch(rows, tok, cfg.replace(train={"method": "dss"}))
    qcrd_batch, no_qj_batch = make_batch(rows, tok, cfg), make_batch(rows, tok, no_qj)  # train.method: qcrd
    lengths = {"question_tokens": int(qcrd_batch.expl_mask.sum(1).float().mean()),
               "rationale_tokens": int((qcrd_batch.cand_labels != -100).sum(1).float().mean()),
               "candidates_per_example": qcrd_batch.cand_labels.shape[0] / args.batch}

    variants = {"dss": (build(args.shape, "dss", cfg), dss_batch),
                "qcrd_naive": (build(args.shape, "qcrd", cfg, naive=True), qcrd_batch),
                "qcrd": (build(args.shape, "qcrd", cfg), qcrd_batch),
                "qcrd_no_qj": (build(args.shape, "qcrd", no_qj), no_qj_batch)}
    n_params = sum(p.numel() for p in variants["dss"][0][0].student.parameters())
    parts = breakdown_parts(variants["qcrd"][0][0], qcrd_batch)
    times: dict[str, list[float]] = {name: [] for name in [*variants, *parts]}
    for repeat in range(args.repeats + 1):
        for name, ((model, opt), batch) in variants.items():
            t = timed(lambda: full_step(model, opt, batch))
            if repeat:
                times[name].append(t)
        qmodel = variants["qcrd"][0][0]
        for name, fn in parts.items():
            qmodel.zero_grad(set_to_none=True)
            t = timed(fn)
            if repeat:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "shape": args.shape, "student_parameters": n_params, "batch": args.batch, "k": args.k,
        "threads": args.threads, "repeats": args.repeats, **lengths,
        "seconds": med,
        "ratio_qcrd_naive_vs_dss": med["qcrd_naive"] / med["dss"],
        "ratio_qcrd_vs_dss": med["qcrd"] / med["dss"],
        "ratio_qcrd_no_qj_vs_dss": med["qcrd_no_qj"] / med["dss"],
        "speedup_qcrd_vs_naive": med["qcrd_naive"] / med["qcrd"],
        "breakdown_share": {name: med[name] / sum(med[p] for p in parts) for name in parts},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"shape {args.shape} ({n_params / 1e6:.1f} M student parameters), batch {args.batch}, K = {args.k} + 1 "
          f"student negative, {args.threads} threads, median of {args.repeats}")
    print(f"question ≈ {lengths['question_tokens']} tokens, rationale ≈ {lengths['rationale_tokens']} tokens, "
          f"{lengths['candidates_per_example']:.0f} candidates per example")
    for name in variants:
        print(f"  {name:<12} {med[name]:8.3f} s/step   {med[name] / med['dss']:5.2f}× DSS")
    print(f"  optimised QCRD is {result['speedup_qcrd_vs_naive']:.2f}× faster than naive")
    print("optimised QCRD breakdown (each part on its own, no optimizer step):")
    for name in parts:
        print(f"  {name:<48} {med[name]:8.3f} s  {result['breakdown_share'][name]:6.1%}")
    return result


if __name__ == "__main__":
    main()
