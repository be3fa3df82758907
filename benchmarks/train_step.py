"""Training-step cost: QCRD (each cost option of issue 13) vs DSS at equal batch, in one run.

Variants (``VARIANTS``): ``dss``; ``qcrd_naive`` (every candidate through the full student with gradient, the
spec's D); ``qcrd_spec`` (optimised step, the spec's D, no deduplication); ``qcrd_dedup`` (+ identical candidates
deduplicated, exact); on top of that, each D option from the spec's D: ``d_layers2``/``d_layers1`` (D = first 2 / 1
encoder layers), ``d_question_states`` (D reads the student's detached question states), ``d_pairs16``/``d_pairs8``
(L_D on ~16 / ~8 pairs per step), pairs of options (``d_layers2_q``, ``d_layers1_q``, ``d_layers2_pairs16``,
``d_layers1_pairs16``, ``d_q_pairs16``), ``cheapest`` / ``cheapest_l1`` (the three together, 2 / 1 layers); ``qcrd`` (``Config()``'s
defaults, whatever D they choose); ``qcrd_no_qj`` (quality judge off: no D); ``qcrd_bf16`` / ``dss_bf16`` (the defaults / DSS under
bf16 autocast).

Each example has K = 5 teacher samples (4 positives, ``--duplicates`` of them a copy of another as happens at
T = 0.7, and 1 teacher negative) and one student negative. Measures: ``flops`` (an exact operation count of one
full training step with torch's FlopCounterMode: independent of machine load; bf16 counts as fp32) and ``time``
(full steps: zero_grad, forward, backward, AdamW; round-robin so load hits every variant alike; median). ``--rss``
runs each variant in its own process and reports its peak RSS. ``--hf`` adds an independent Hugging Face
``Seq2SeqTrainer`` implementation of distilling step-by-step (``compute_loss`` overridden: label CE + λ ·
rationale CE) timed on the same model shape, batch, threads and data (needs ``accelerate``).

Decoder-only students (``--family causal``; default ``seq2seq``, the T5 runs above): a Qwen2 model with random
weights (``--shape qwen0.5b``: Qwen2.5-0.5B's 494 M parameters, 151936-token vocabulary tied with the LM head, 24
layers, hidden 896, intermediate 4864, 14 query / 2 key-value heads; ``tiny`` for a smoke run), batches made by
``make_batch`` with ``student.family: causal`` (prompts left-padded, the explain prompt's keys/values shared by its
candidates). Its variants (``CAUSAL_VARIANTS``): ``dss``, ``qcrd`` (defaults), ``qcrd_default_naive`` (the same
config on the naive path: every candidate through the full model with its own prompt pass), ``dss_lora`` /
``qcrd_lora`` (LoRA r = 8 through ``students.lora.apply_lora``, on every linear module but the LM head, or
``--lora-targets default``: peft's default, q/v). Options for a shape that does not fit a small machine:
``--layers N`` (the student's depth), ``--flops-layers A,B`` (count operations at depths A and B and extrapolate
linearly to the shape's full depth: exact for A >= 2, every layer from the second on costing the same; under LoRA
the first layer, reading the frozen embedding, skips its q/k/v input gradients), ``--one-at-a-time`` (time
round-robin with one variant alive at a time: each round builds every variant in turn, takes a warm-up step and
``--steps`` timed steps, frees it). Causal operations are counted with eager attention (torch's CPU
``scaled_dot_product_attention`` kernels are invisible to FlopCounterMode); times use the model's default (sdpa).
``--snapshot-bytes`` reports what the SnapshotStore receives per round (``students.lora.trainable_state``) with
full weights and with LoRA.

    python benchmarks/train_step.py                          # T5-small shape (60 M parameters), batch 8
    python benchmarks/train_step.py --shape tiny --measure both --rss --hf   # a smoke run
    python benchmarks/train_step.py --family causal --shape tiny --measure both --snapshot-bytes   # causal smoke
    python benchmarks/train_step.py --family causal --flops-layers 2,3       # Qwen2.5-0.5B shape, batch 8, ops
    python benchmarks/train_step.py --family causal --batch 2 --measure time --one-at-a-time
    benchmarks/gpu_train_step.sh                             # the same on a GPU, fp32 vs bf16
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import statistics
import subprocess
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, T5Config, T5ForConditionalGeneration

from qcrd_ray.config import Config
from qcrd_ray.data import prompts
from qcrd_ray.qcrd.discriminator import Discriminator
from qcrd_ray.qcrd.step import DistillModel, accumulate, make_batch
from qcrd_ray.students import family_named, lora
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SHAPES = {
    # t5-small: 60.5 M parameters (32k vocabulary, 6+6 layers, d_model 512, d_ff 2048, 8 heads)
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                  feed_forward_proj="relu"),
    "tiny": dict(vocab_size=800, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu"),
}
CAUSAL_SHAPES = {
    # Qwen2.5-0.5B: 494 M parameters (151936 vocabulary, the LM head tied to the embedding, 24 layers, hidden 896,
    # intermediate 4864, 14 query heads and 2 key-value heads of 64, q/k/v biases), random weights
    "qwen0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
                     max_position_embeddings=32768, rope_theta=1000000.0),
    "tiny": dict(vocab_size=800, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}
SHAPES_OF = {"seq2seq": SHAPES, "causal": CAUSAL_SHAPES}
DEFAULT_SHAPE = {"seq2seq": "small", "causal": "qwen0.5b"}
DEPTH_KEY = {"seq2seq": "num_layers", "causal": "num_hidden_layers"}
WORDS = ("apples oranges baskets students teacher bought sold gave each more than less total remaining left "
         "shelves pages books minutes hours farmer market price dollars tickets children cookies boxes").split()


def sentence(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < 0.8 else str(rng.randint(2, 99)) for _ in range(n_words))


def make_rows(n: int, k: int, q_words: int, r_words: int, seed: int = 0, duplicates: int = 0) -> list[dict]:
    """Teacher rows shaped like SVAMP: a question, K samples split K-1 positives / 1 negative (``duplicates`` of the
    positives repeat the first one), one student negative."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = f"( {i + 3} + 4 )", f"( {i + 3} - 4 )"
        rationales = [sentence(rng, r_words) for _ in range(k)]
        for d in range(min(duplicates, k - 2)):
            rationales[k - 1 - d] = rationales[1]
        samples = [{"index": j, "text": r, "rationale": r, "answer": bad if j == 0 else good, "status": "ok",
                    "error": ""} for j, r in enumerate(rationales)]
        rows.append({
            "id": f"b{i}", "task": "synthetic", "input": sentence(rng, q_words) + " ?", "choices": [], "label": good,
            "positives": rationales[1:], "negatives": rationales[:1], "majority_answer": good, "agreement": 0.8,
            "teacher_correct": True, "samples": samples, "negative_round": 0,
            "student_negatives": [prompts.explain_target(sentence(rng, r_words), bad)],
        })
    return rows


def word_tokenizer(texts: list[str], append_eos: bool = True) -> PreTrainedTokenizerFast:
    """One token per word or punctuation mark, so token counts follow the word counts of the synthetic text (the
    student's Unigram tokenizer, trained on this little text, falls back to single characters). ``append_eos``:
    every encoded text ends in ``</s>`` (T5's convention; a causal student's prompts do not, its completions get
    their ``</s>`` from the family, as ``students.tokenizer.train_tokenizer(append_eos=False)``)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def t5(shape: str, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**SHAPES[shape], tie_word_embeddings=False, pad_token_id=0,
                                               eos_token_id=1, decoder_start_token_id=0))


def qwen(shape: str, seed: int = 0, layers: int | None = None, attn: str | None = None,
         device: str | None = None) -> Qwen2ForCausalLM:
    """A Qwen2 model of ``CAUSAL_SHAPES[shape]`` with random weights (``layers``: its depth instead; ``attn``: the
    attention implementation, default sdpa), built on ``device`` (default: the current default device). Pad id 0
    and eos id 1, as ``word_tokenizer``."""
    torch.manual_seed(seed)
    config = Qwen2Config(**{**CAUSAL_SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})},
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    if attn:
        config._attn_implementation = attn
    with torch.device(device) if device else contextlib.nullcontext():
        return Qwen2ForCausalLM(config)


def make_student(family: str, shape: str, seed: int = 0, layers: int | None = None, attn: str | None = None,
                 device: str | None = None):
    if family == "causal":
        return qwen(shape, seed, layers, attn, device)
    if layers:  # T5: encoder and decoder depth (num_decoder_layers follows num_layers)
        torch.manual_seed(seed)
        return T5ForConditionalGeneration(T5Config(**{**SHAPES[shape], "num_layers": layers},
                                                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                                                   decoder_start_token_id=0))
    return t5(shape, seed)


def lora_targets(student, which: str) -> list[str]:
    """LoRA's target modules: ``all`` = every linear module but the LM head (what configs/paper's LoRA configs
    name for Qwen2: q/k/v/o and the MLP's gate/up/down), ``default`` = peft's default for the model type."""
    if which == "default":
        return []
    return [n for n in lora.linear_module_names(student) if n != "lm_head"]


def build(shape: str, cfg: Config, naive: bool = False, seed: int = 0, device: str = "cpu",
          family: str = "seq2seq", layers: int | None = None, attn: str | None = None, targets: str = "all"):
    """``(DistillModel, AdamW)`` as train/loop.py builds them: the student (LoRA adapters on it when
    ``student.lora.r`` > 0), D from the student, fused AdamW on ``param_groups``."""
    student = make_student(family, shape, seed, layers, attn, device=None if family == "seq2seq" else device)
    if cfg.student.lora.r:
        if not cfg.student.lora.target_modules:
            cfg = cfg.replace(student={"lora": {"target_modules": lora_targets(student, targets)}})
        torch.manual_seed(seed)
        student = lora.apply_lora(student, cfg.student.lora, family)
    needs_d = cfg.train.method == "qcrd" and cfg.loss.quality_judge
    disc = Discriminator.from_student(student, cfg.discriminator) if needs_d else None
    model = DistillModel(student, disc, cfg, naive=naive).to(device)
    return model, torch.optim.AdamW(model.param_groups(), lr=1e-4, fused=True)  # as train/loop.py


def parameter_counts(model: DistillModel) -> dict:
    """Parameters of the student (all / trainable) and D's own (not shared with the student), each counted once."""
    student = {id(p): p for p in model.student.parameters()}
    own_d = {id(p): p for p in (model.disc.parameters() if model.disc is not None else ()) if id(p) not in student}
    return {"student": sum(p.numel() for p in student.values()),
            "student_trainable": sum(p.numel() for p in student.values() if p.requires_grad),
            "disc_own": sum(p.numel() for p in own_d.values()),
            "optimizer": sum(p.numel() for g in model.param_groups() for p in g["params"])}


# the spec's D (a full copy of the student's encoder reading question + rationale, L_D on every pair)
SPEC_D = {"layers": 0, "share_question_states": False, "pairs_per_step": 0}


def d(**options) -> dict:
    """Config overrides: the spec's D with ``options`` changed (whatever D the defaults hold)."""
    return {"discriminator": {**SPEC_D, **options}}


# name -> (config overrides on Config(), naive)
VARIANTS = {
    "dss": ({"train": {"method": "dss"}}, False),
    "qcrd_naive": ({**d(), "train": {"dedup_candidates": False}}, True),
    "qcrd_spec": ({**d(), "train": {"dedup_candidates": False}}, False),
    "qcrd_dedup": (d(), False),
    "d_layers2": (d(layers=2), False),
    "d_layers1": (d(layers=1), False),
    "d_question_states": (d(share_question_states=True), False),
    "d_pairs16": (d(pairs_per_step=16), False),
    "d_pairs8": (d(pairs_per_step=8), False),
    "d_layers2_q": (d(layers=2, share_question_states=True), False),
    "d_layers1_q": (d(layers=1, share_question_states=True), False),
    "d_layers2_pairs16": (d(layers=2, pairs_per_step=16), False),
    "d_layers1_pairs16": (d(layers=1, pairs_per_step=16), False),
    "d_q_pairs16": (d(share_question_states=True, pairs_per_step=16), False),
    "cheapest": (d(layers=2, share_question_states=True, pairs_per_step=16), False),
    "cheapest_l1": (d(layers=1, share_question_states=True, pairs_per_step=16), False),
    "qcrd": ({}, False),
    "qcrd_no_qj": ({"loss": {"quality_judge": False}}, False),
    "qcrd_bf16": ({"train": {"precision": "bf16"}}, False),
    "dss_bf16": ({"train": {"method": "dss", "precision": "bf16"}}, False),
}
SEQ2SEQ_VARIANTS = tuple(VARIANTS)  # --family seq2seq's default list (the runs recorded before causal students)
LORA = {"student": {"lora": {"r": 8, "alpha": 16.0}}}  # target modules: --lora-targets
VARIANTS.update({
    # Config()'s defaults on the naive path: what the shared prompt pass saves, D and everything else equal
    "qcrd_default_naive": ({}, True),
    "dss_lora": ({**LORA, "train": {"method": "dss"}}, False),
    "qcrd_lora": (LORA, False),
    "qcrd_default_naive_bf16": ({"train": {"precision": "bf16"}}, True),
    "dss_lora_bf16": ({**LORA, "train": {"method": "dss", "precision": "bf16"}}, False),
    "qcrd_lora_bf16": ({**LORA, "train": {"precision": "bf16"}}, False),
})
CAUSAL_VARIANTS = ("dss", "qcrd", "qcrd_default_naive", "dss_lora", "qcrd_lora")  # --family causal's default list


def variant_config(name: str, family: str = "seq2seq") -> Config:
    overrides, _ = VARIANTS[name]
    cfg = Config().replace(student={"family": family})
    for section, values in overrides.items():
        cfg = cfg.replace(**{section: values})
    return cfg


def full_step(model, opt, batch) -> None:
    """One optimizer step as train/loop.py takes it (one micro-batch): zero_grad, accumulate, clip, AdamW."""
    opt.zero_grad(set_to_none=True)
    accumulate(model, [batch], alpha3=0.5)
    torch.nn.utils.clip_grad_norm_(model.parameters(), Config().train.grad_clip)
    opt.step()


def clock(device: str) -> tuple[float, float]:
    """(wall, process CPU) seconds now. On a loaded CPU machine the CPU time is the step's own work (what it would
    take alone with ``--threads 1``), the wall time also counts waiting for a core."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def timed(fn, device: str) -> float:
    """Wall seconds of ``fn()``."""
    start = clock(device)[0]
    fn()
    return clock(device)[0] - start


def timed_both(fn, device: str) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn()``."""
    start = clock(device)
    fn()
    return tuple(b - a for a, b in zip(start, clock(device)))


def step_flops(model, opt, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        full_step(model, opt, batch)
    return counter.get_total_flops()


def hf_dss_seconds(shape: str, rows: list[dict], tok, repeats: int, device: str, lam: float,
                   between=None) -> list[tuple[float, float]]:
    """Step times, (wall, CPU) seconds, warm-up first, of an independent distilling step-by-step on Hugging Face's Seq2SeqTrainer: two
    seq2seq losses (label given ``predict: x``, rationale given ``explain: x``) in an overridden ``compute_loss``;
    AdamW and gradient clipping at 1.0 (its defaults), as our loop. ``between()`` runs after each of its steps, so
    our own step is timed round-robin with its steps."""
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from qcrd_ray.qcrd.targets import one_rationale

    def enc(texts, target=False):
        kw = {"text_target": texts} if target else {}
        out = tok(**({"text": texts} if not target else {}), **kw, padding=True, return_tensors="pt")
        return out

    items = [{"pred": prompts.student_input("predict", r["input"]), "expl": prompts.student_input("explain", r["input"]),
              "label": r["label"], "rationale": one_rationale(r)} for r in rows]

    def collate(batch):
        p, e = enc([b["pred"] for b in batch]), enc([b["expl"] for b in batch])
        y, z = enc([b["label"] for b in batch], True)["input_ids"], enc([b["rationale"] for b in batch], True)["input_ids"]
        return {"input_ids": p["input_ids"], "attention_mask": p["attention_mask"], "labels": y.masked_fill(y == 0, -100),
                "expl_input_ids": e["input_ids"], "expl_attention_mask": e["attention_mask"],
                "rationale_labels": z.masked_fill(z == 0, -100)}

    class DSSTrainer(Seq2SeqTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            label = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                          labels=inputs["labels"])
            rationale = model(input_ids=inputs["expl_input_ids"], attention_mask=inputs["expl_attention_mask"],
                              labels=inputs["rationale_labels"])
            loss = label.loss + lam * rationale.loss
            return (loss, label) if return_outputs else loss

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], (0.0, 0.0)

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = clock(device)

        def on_step_end(self, args, state, control, **kw):
            self.times.append(tuple(b - a for a, b in zip(self.t0, clock(device))))
            if between is not None:
                between()

    stopwatch = Clock()
    args = Seq2SeqTrainingArguments(output_dir="/tmp/hf_dss_bench", per_device_train_batch_size=len(rows),
                                    max_steps=repeats + 1, learning_rate=1e-4, report_to=[], save_strategy="no",
                                    logging_strategy="no", remove_unused_columns=False, dataloader_num_workers=0,
                                    use_cpu=device == "cpu", disable_tqdm=True)
    trainer = DSSTrainer(model=t5(shape).to(device), args=args, train_dataset=items, data_collator=collate,
                         callbacks=[stopwatch])
    with contextlib.redirect_stdout(sys.stderr):  # its end-of-training metrics line would break --json
        trainer.train()
    return stopwatch.times


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=tuple(SHAPES_OF), default="seq2seq",
                        help="student family: seq2seq (T5, default) or causal (decoder-only, Qwen2)")
    parser.add_argument("--shape", choices=sorted(set(SHAPES) | set(CAUSAL_SHAPES)), default=None,
                        help="model shape (default: small for seq2seq, qwen0.5b for causal)")
    parser.add_argument("--layers", type=int, default=None, help="the student's depth instead of the shape's")
    parser.add_argument("--flops-layers", default=None, metavar="A,B",
                        help="count operations at depths A and B and extrapolate linearly to the full depth (exact for "
                             "A >= 2: under LoRA the first layer skips some input gradients)")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="time with one variant alive at a time: each round builds each variant in turn, "
                             "takes a warm-up step and --steps timed steps, frees it (for shapes whose variants "
                             "do not fit in memory together)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per build under --one-at-a-time")
    parser.add_argument("--lora-targets", choices=("all", "default"), default="all",
                        help="LoRA variants' target modules: every linear module but the LM head (default), or "
                             "peft's default for the model type (q/v)")
    parser.add_argument("--snapshot-bytes", action="store_true",
                        help="bytes of students.lora.trainable_state (a SnapshotStore round) at the shape, full "
                             "weights vs LoRA")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (default 8, the per-worker batch)")
    parser.add_argument("--k", type=int, default=5, help="teacher samples per example")
    parser.add_argument("--duplicates", type=int, default=1,
                        help="positives per example that repeat another (identical samples at T = 0.7)")
    parser.add_argument("--question-words", type=int, default=45, help="SVAMP-like: ~50 tokens with the prefix")
    parser.add_argument("--rationale-words", type=int, default=50, help="~64 target tokens with the answer")
    parser.add_argument("--measure", choices=("flops", "time", "both"), default="flops")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of " + ",".join(VARIANTS) + " (default: seq2seq: "
                             + ",".join(SEQ2SEQ_VARIANTS) + "; causal: " + ",".join(CAUSAL_VARIANTS) + ")")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rss", action="store_true", help="peak RSS of each variant, each in its own process")
    parser.add_argument("--hf", action="store_true", help="time an independent HF Seq2SeqTrainer DSS beside ours")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads oversubscribe "
                             "and a step slows down by an order of magnitude)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.shape = args.shape or DEFAULT_SHAPE[args.family]
    if args.shape not in SHAPES_OF[args.family]:
        parser.error(f"--shape {args.shape} is not a {args.family} shape: {', '.join(SHAPES_OF[args.family])}")
    if args.hf and (args.family != "seq2seq" or args.layers):
        parser.error("--hf (HF Seq2SeqTrainer DSS) compares seq2seq students at their shape's depth only")
    depth = args.layers or SHAPES_OF[args.family][args.shape][DEPTH_KEY[args.family]]
    flops_layers = [int(n) for n in args.flops_layers.split(",")] if args.flops_layers else None
    if flops_layers and (len(flops_layers) != 2 or flops_layers[0] >= flops_layers[1]):
        parser.error("--flops-layers A,B with A < B")
    if args.variants is None:
        args.variants = ",".join(CAUSAL_VARIANTS if args.family == "causal" else SEQ2SEQ_VARIANTS)
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.device == "cpu" and args.measure == "flops":  # bf16 = fp32 in operations
        names = [n for n in names if not n.endswith("_bf16")]

    rows = make_rows(args.batch, args.k, args.question_words, args.rationale_words, duplicates=args.duplicates)
    texts = [prompts.student_input(m, r["input"]) for r in rows for m in ("predict", "explain")]
    texts += [t for r in rows for t in r["positives"] + r["negatives"] + r["student_negatives"]] + WORDS
    texts += [f"question: {r['input']} rationale: The answer is" for r in rows]
    family = family_named(args.family)
    # a causal student's prompts end where its completion starts: no </s> appended (the family adds the
    # completion's); its tokenizer goes through the family's preparation, as students.load_student does
    tok = family.prepare_tokenizer(word_tokenizer(texts, append_eos=args.family == "seq2seq"))

    def prepared(name, layers=args.layers, attn=None):
        cfg = variant_config(name, args.family)
        model_opt = build(args.shape, cfg, naive=VARIANTS[name][1], device=args.device, family=args.family,
                          layers=layers, attn=attn, targets=args.lora_targets)
        return model_opt, make_batch(rows, tok, cfg, family).to(args.device)

    result = {"family": args.family, "shape": args.shape, "layers": depth, "batch": args.batch, "k": args.k,
              "duplicates": args.duplicates, "threads": args.threads, "device": args.device,
              "lora_targets": args.lora_targets, "argv": list(sys.argv[1:] if argv is None else argv),
              "load_before": load()}
    if args.snapshot_bytes:
        result["snapshot_bytes"] = snapshot_bytes(args.family, args.shape, args.layers)
    params = {}
    if args.measure in ("flops", "both"):  # one variant alive at a time: ~1.5 GB each at T5-small shape
        flops, gpu_peak, points = {}, {}, {}
        # causal: eager attention, whose matmuls FlopCounterMode sees (not CPU sdpa's fused kernel)
        attn = "eager" if args.family == "causal" else None
        for name in names:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if flops_layers:  # exact: the step's operations are affine in the depth (every layer the same)
                counts = {}
                for layers in flops_layers:
                    (model, opt), batch = prepared(name, layers, attn)
                    counts[layers] = step_flops(model, opt, batch)
                    del model, opt, batch
                    gc.collect()
                (a, fa), (b, fb) = counts.items()
                flops[name] = fa + (depth - a) * (fb - fa) / (b - a)
                points[name] = {layers: f / 1e9 for layers, f in counts.items()}
            else:
                (model, opt), batch = prepared(name, attn=attn)
                params[name] = parameter_counts(model)
                flops[name] = step_flops(model, opt, batch)
                del model, opt, batch
                gc.collect()
            if args.device == "cuda":  # model, D, AdamW state and the step's activations: what one worker holds
                gpu_peak[name] = torch.cuda.max_memory_allocated() / 2**20
        result["gflops"] = {n: f / 1e9 for n, f in flops.items()}
        if points:
            result["gflops_at_layers"] = points
        if gpu_peak:
            result["peak_gpu_mib"] = gpu_peak
        if "dss" in flops:
            result["flops_vs_dss"] = {n: f / flops["dss"] for n, f in flops.items()}
    variants = {}
    if args.measure in ("time", "both"):
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        if args.one_at_a_time:  # round-robin over builds: one variant in memory at a time
            gpu_peak, failed = {}, {}
            for repeat in range(args.repeats):
                for name in [n for n in names if n not in failed]:
                    if args.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    model = opt = batch = None
                    try:
                        (model, opt), batch = prepared(name)
                        params[name] = parameter_counts(model)
                        full_step(model, opt, batch)  # warm-up: AdamW's state, first-touch allocations
                        for _ in range(args.steps):
                            times[name].append(timed_both(lambda: full_step(model, opt, batch), args.device))
                    except torch.OutOfMemoryError as err:  # a large batch on a GPU: the others still run
                        failed[name] = f"out of memory: {str(err).splitlines()[0]}"
                        times.pop(name, None)
                    if args.device == "cuda":
                        gpu_peak[name] = max(gpu_peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
                    del model, opt, batch
                    gc.collect()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
            if gpu_peak:
                result["peak_gpu_mib_timed"] = gpu_peak
            if failed:
                result["failed"] = failed
        else:  # round-robin: every variant alive at once
            variants = {name: prepared(name) for name in names}
            for name, ((model, _), _) in variants.items():
                params[name] = parameter_counts(model)
            for repeat in range(args.repeats + 1):
                for name, ((model, opt), batch) in variants.items():
                    t = timed_both(lambda: full_step(model, opt, batch), args.device)
                    if repeat:
                        times[name].append(t)
        med = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
        result["seconds"] = med
        result["cpu_seconds"] = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
        result["steps"] = times
        if "dss" in med and med["dss"] > 0:
            result["time_vs_dss"] = {n: t / med["dss"] for n, t in med.items()}
            result["cpu_vs_dss"] = {n: t / result["cpu_seconds"]["dss"] for n, t in result["cpu_seconds"].items()}
    if params:
        result["parameters"] = params
    if args.hf:
        ours: list[tuple[float, float]] = []
        if "dss" in names:  # ours alternates with HF's steps: one step each, in turn
            (dss_model, dss_opt), dss_batch = variants.get("dss") or prepared("dss")

            def between():
                start = clock(args.device)
                full_step(dss_model, dss_opt, dss_batch)
                ours.append(tuple(b - a for a, b in zip(start, clock(args.device))))
        else:
            between = None
        try:
            hf = hf_dss_seconds(args.shape, rows, tok, args.repeats, args.device, Config().loss.dss_lambda, between)
            result["hf_dss_seconds"], result["hf_dss_cpu_seconds"] = (statistics.median(t) for t in zip(*hf[1:]))
            result["hf_steps"] = hf
            if ours:
                result["ours_dss_seconds_vs_hf"], result["ours_dss_cpu_seconds_vs_hf"] = (
                    statistics.median(t) for t in zip(*ours[1:]))
                result["ours_steps_vs_hf"] = ours
                result["ours_dss_vs_hf"] = result["ours_dss_seconds_vs_hf"] / result["hf_dss_seconds"]
                result["ours_dss_cpu_vs_hf"] = result["ours_dss_cpu_seconds_vs_hf"] / result["hf_dss_cpu_seconds"]
        except ImportError as err:  # Trainer needs `accelerate`
            result["hf_dss_seconds"] = f"not run: {err}"
    if args.rss:
        result["peak_rss_mib"] = {name: peak_rss(name, args) for name in names}
    result["load_after"] = load()
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{args.family} shape {args.shape} ({depth} layers), batch {args.batch}, K = {args.k} ({args.duplicates} "
          f"duplicate) + 1 student negative, {args.threads} threads, {args.device}, "
          f"load {result['load_before']} -> {result['load_after']}")
    for name in names:
        cells = [f"{name:<18}"]
        if "flops_vs_dss" in result:
            cells.append(f"{result['gflops'][name]:9.1f} GFLOP {result['flops_vs_dss'][name]:5.2f}× DSS")
        if name in result.get("failed", {}):
            cells.append(result["failed"][name])
        elif "time_vs_dss" in result:
            cells.append(f"{result['seconds'][name]:8.3f} s {result['time_vs_dss'][name]:5.2f}× DSS")
            cells.append(f"CPU {result['cpu_seconds'][name]:8.3f} s {result['cpu_vs_dss'][name]:5.2f}× DSS")
        elif "seconds" in result:
            cells.append(f"{result['seconds'][name]:8.3f} s  CPU {result['cpu_seconds'][name]:8.3f} s")
        if "peak_rss_mib" in result:
            cells.append(f"{result['peak_rss_mib'][name]:7.0f} MiB peak RSS")
        if "peak_gpu_mib" in result:
            cells.append(f"{result['peak_gpu_mib'][name]:7.0f} MiB peak GPU")
        print("  ".join(cells))
    if "snapshot_bytes" in result:
        for key, value in result["snapshot_bytes"].items():
            print(f"snapshot {key}: {value}")
    if args.hf:
        print(f"HF Seq2SeqTrainer DSS: {result['hf_dss_seconds']}"
              + (f" s/step; ours {result['ours_dss_seconds_vs_hf']:.3f} s/step round-robin with it = "
                 f"{result['ours_dss_vs_hf']:.2f}× its time ({result['ours_dss_cpu_vs_hf']:.2f}× its CPU time: "
                 f"{result['ours_dss_cpu_seconds_vs_hf']:.3f} vs {result['hf_dss_cpu_seconds']:.3f} s)"
                 if "ours_dss_vs_hf" in result else ""))
    return result


def snapshot_bytes(family: str, shape: str, layers: int | None = None) -> dict:
    """What a SnapshotStore round receives, ``students.lora.trainable_state`` of the student at ``shape`` (fp32, the
    default ``student.dtype``; bf16 halves every figure), with full weights and with LoRA: ``state_dict_bytes`` =
    sum(numel × element_size) over its keys (what the persisted safetensors file holds: it stores tied tensors
    once per key), ``distinct_bytes`` = each distinct tensor once (what ``SnapshotState`` pickles into Ray's object
    store: tied weights go once). Weights are allocated without initialising them (their values do not matter)."""
    import copy

    from qcrd_ray.config import LoraConfig

    with torch.device("meta"):
        model = make_student(family, shape, 0, layers)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # tied weights share one tensor again (to_empty keeps them so; made sure)
    out = {}

    def measure(state):
        distinct = {}
        for t in state.values():  # the identity SnapshotState dedups on
            distinct[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)] = t
        return {"tensors": len(state), "state_dict_bytes": sum(t.numel() * t.element_size() for t in state.values()),
                "distinct_bytes": sum(t.numel() * t.element_size() for t in distinct.values()),
                "parameters": sum(t.numel() for t in distinct.values())}

    out["full"] = measure(lora.trainable_state(model))
    for r, which in ((8, "default"), (8, "all"), (16, "all")):
        cfg = LoraConfig(r=r, alpha=2.0 * r, target_modules=tuple(lora_targets(model, which)))
        targets = lora.target_modules(model, cfg)
        wrapped = lora.apply_lora(copy.deepcopy(model), cfg, family)
        out[f"lora_r{r}_{which}"] = {**measure(lora.trainable_state(wrapped)), "targets": targets}
        del wrapped
    full = out["full"]["distinct_bytes"]
    for key, value in out.items():
        value["vs_full_distinct"] = value["distinct_bytes"] / full
    return out


def peak_rss(name: str, args) -> float:
    """Peak RSS (MiB) of a fresh process that builds ``name`` and takes two full steps. Read as the process's
    VmHWM: ``ru_maxrss`` survives fork + exec on Linux, so every child reported this parent's own peak."""
    code = ("import sys; sys.argv = ['x']; import benchmarks.train_step as b; "
            f"b.main(['--family', {args.family!r}, '--shape', {args.shape!r}, '--batch', '{args.batch}', "
            f"'--variants', {name!r}, '--lora-targets', {args.lora_targets!r}, "
            + (f"'--layers', '{args.layers}', " if args.layers else "")
            + f"'--measure', 'time', '--repeats', '1', '--device', {args.device!r}, '--json']); "
            "print('RSS', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out.rsplit("RSS", 1)[1]) / 1024  # kB


if __name__ == "__main__":
    main()
