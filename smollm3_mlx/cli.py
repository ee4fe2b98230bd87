"""The smollm3-mlx command: thin typer commands over the Python API."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from . import console

app = typer.Typer(
    name="smollm3-mlx",
    help="Run Hugging Face's SmolLM3-3B on Apple MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Model = Annotated[str, typer.Option("--model", "-m", help="Local model folder or hub repo id.")]
DType = Annotated[
    str,
    typer.Option(
        help="Compute dtype: auto (float32 on the CPU, stored dtype on the GPU), "
        "float32, bfloat16 or float16."
    ),
]


@app.command()
def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; read from stdin if absent.")
    ] = None,
    model: Model = "HuggingFaceTB/SmolLM3-3B",
    max_tokens: Annotated[int, typer.Option(help="The most tokens to generate.")] = 4096,
    temperature: Annotated[
        float | None,
        typer.Option(
            "--temp",
            help="Sampling temperature (default from generation_config.json; 0 is greedy).",
        ),
    ] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    dtype: DType = "auto",
    stats: Annotated[
        bool, typer.Option("--stats/--no-stats", help="Print speed and memory on stderr.")
    ] = False,
) -> None:
    """Complete a raw prompt (no chat template) and stream the text to stdout."""
    import mlx.core as mx

    from .generate import stream_generate
    from .loading import ModelLoadError, load
    from .sample import make_sampler

    if prompt is None:
        prompt = sys.stdin.read()
    try:
        m, tokenizer = load(model, dtype=None if dtype == "stored" else dtype)
    except (ModelLoadError, OSError) as e:
        console.error(str(e))
        raise typer.Exit(1) from None
    if seed is not None:
        mx.random.seed(seed)
    g = m.generation_config
    sampler = make_sampler(
        g.temperature if temperature is None else temperature,
        g.top_p if top_p is None else top_p,
        g.top_k,
        g.min_p,
    )
    last = None
    for last in stream_generate(m, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler):
        console.write(last.text)
    console.write("\n")
    if stats and last is not None:
        console.stats(last)


if __name__ == "__main__":
    app()
