"""vLLM through Ray Data LLM: ``ray.data.llm.build_processor(vLLMEngineProcessorConfig(...))``.

Not a map_batches callable class like the other backends: the processor is a Dataset -> Dataset stage with its
own autoscaling engine pool. Each sample row carries its own ``sampling_params`` (temperature, seed,
max_tokens, stop), and ``should_continue_on_error`` turns a failed row into an ``__inference_error__`` that
`output_columns` maps to our ``error`` column. vLLM itself is imported only inside the processor's workers
(the ``gpu`` extra); building the config needs only Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:  # annotations only: the config imports the backend registry
    from qcrd_ray.config import Config, TeacherConfig


def sampling_params(t: TeacherConfig, seed: int) -> dict:
    params = {"temperature": t.temperature, "seed": int(seed), "max_tokens": t.max_tokens}
    if t.stop:
        params["stop"] = list(t.stop)
    return params


def processor_config_kwargs(cfg: Config) -> dict:
    """The `vLLMEngineProcessorConfig` arguments of a run: pool bounds and batch size from the teacher config,
    engine settings, and the chat template only for the chat API (``api: completions`` sends the raw prompt)."""
    t = cfg.teacher
    chat = t.api == "chat"
    return {
        "model_source": t.model,
        "batch_size": t.batch_size,
        "concurrency": (t.min_actors, t.max_actors),
        "engine_kwargs": {
            "tensor_parallel_size": t.tensor_parallel_size,
            "max_model_len": t.max_model_len,
            "gpu_memory_utilization": t.gpu_memory_utilization,
        },
        "should_continue_on_error": True,
        "chat_template_stage": chat,
        "tokenize_stage": True,
        "detokenize_stage": True,
    }


def build_config(cfg: Config):
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(**processor_config_kwargs(cfg))


def make_preprocess(t: TeacherConfig):
    """Row -> the processor's input columns (other columns are carried through)."""

    def preprocess(row: dict) -> dict:
        params = sampling_params(t, row["seed"])
        if t.api == "chat":
            return {"messages": [{"role": "user", "content": row["prompt"]}], "sampling_params": params}
        return {"prompt": row["prompt"], "sampling_params": params}

    return preprocess


def output_columns(batch: pa.Table, sample_columns: list[str]) -> pa.Table:
    """The sample columns plus ``text``/``error`` from the processor's ``generated_text`` and
    ``__inference_error__`` (error rows bypass a processor's postprocess, so this runs as a stage after it)."""
    n = batch.num_rows
    names = set(batch.column_names)
    text = batch.column("generated_text").to_pylist() if "generated_text" in names else [""] * n
    error = batch.column("__inference_error__").to_pylist() if "__inference_error__" in names else [""] * n
    out = batch.select([c for c in sample_columns if c in names])
    return out.append_column("text", pa.array([x or "" for x in text], pa.string())).append_column(
        "error", pa.array([str(e) if e else "" for e in error], pa.string())
    )


# what the parse after the processor needs of a sample row (the processor carries every column through)
SAMPLE_COLUMNS = ["shard", "id", "sample_index", "seed", "choices"]


def build(ds, cfg: Config, then):
    """The registry entry's ``build``: the Dataset of sample rows -> the same rows with ``text`` and ``error``, then
    ``then`` (the parse), in one light stage after the processor."""
    from ray.data.llm import build_processor

    processor = build_processor(
        build_config(cfg),
        preprocess=make_preprocess(cfg.teacher),
        preprocess_map_kwargs={"num_cpus": cfg.teacher.num_cpus},
    )
    return processor(ds).map_batches(
        lambda batch: then(output_columns(batch, SAMPLE_COLUMNS)), batch_format="pyarrow",
        num_cpus=cfg.teacher.num_cpus,
    )
