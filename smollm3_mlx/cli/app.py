"""The smollm3-mlx command: thin typer commands over the Python API."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from . import console, launch
from .launch import DEFAULT_MODEL_NAME, compute_dtype, default_model_dir, load_model as _load
from .options import (
    ChatSettings,
    DType,
    HideThinking,
    KeepThinking,
    KVBits,
    KVGroupSize,
    KVStart,
    MaxContext,
    MaxTokens,
    MemoryCheck,
    Model,
    PromptLookup,
    Seed,
    System,
    Temperature,
    Think,
    ThinkBudget,
    TopP,
    in_range,
)


def _metavars_only(params: list[Any]) -> list[Any]:
    """typer's rich help labels every option with its Python type (<bool>, <str>, <int>); show
    the option's metavar instead, and nothing for a flag or an argument (its name says it)."""
    for p in params:
        shown = (
            None if p.param_type_name == "argument" or getattr(p, "is_flag", False) else p.metavar
        )
        p.display_type_rich = lambda ctx, shown=shown: shown
    return params


class _Group(TyperGroup):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            command.get_params = lambda ctx, get=command.get_params: _metavars_only(get(ctx))

    def get_params(self, ctx):
        return _metavars_only(super().get_params(ctx))


app = typer.Typer(
    name="smollm3-mlx",
    help="Run Hugging Face's SmolLM3-3B on Apple MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        from .._version import __version__

        try:
            mlx = f" (mlx {version('mlx')})"
        except PackageNotFoundError:
            mlx = ""
        console.write(f"smollm3-mlx {__version__}{mlx}\n")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_version
        ),
    ] = False,
) -> None:
    """Run Hugging Face's SmolLM3-3B on Apple MLX."""
    # Bytes that are not UTF-8 on stdin arrive as escapes, never an error: every text that
    # goes on is made valid (console.text), with one warning line.
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(errors="surrogateescape")


def _text(value: str | None, what: str) -> str | None:
    return None if value is None else console.text(value, what)


@app.command()
def chat(
    model: Model = None,
    think: Think = True,
    hide_thinking: HideThinking = False,
    keep_thinking: KeepThinking = True,
    system: System = None,
    max_tokens: MaxTokens = 8192,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    dtype: DType = "auto",
    max_context: MaxContext = None,
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = 64,
    kv_start: KVStart = 0,
    prompt_lookup: PromptLookup = 0,
    think_budget: ThinkBudget = None,
    memory_check: MemoryCheck = True,
    prompt_cache: Annotated[
        Path | None,
        typer.Option(
            help="A prompt-cache file (smollm3-mlx cache-prompt): its system prompt is not "
            "prefilled again; its conversation is restored unless --system is given.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Chat in the terminal; /help lists the commands, Ctrl-C answers now while the model thinks
    and stops the answer while it answers, Ctrl-D exits."""
    from .repl import Loading, run

    settings = ChatSettings(
        model=model,
        dtype=dtype,
        think=think,
        system=_text(system, "--system"),
        keep_thinking=keep_thinking,
        hide_thinking=hide_thinking,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        max_context=max_context,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        kv_start=kv_start,
        prompt_lookup=prompt_lookup,
        think_budget=think_budget,
        memory_check=memory_check,
        prompt_cache=prompt_cache,
    )
    try:
        if prompt_cache is not None:  # a bad file is one line before the prompt, not after
            from ..cache_file import PromptCacheError, read_metadata

            try:
                read_metadata(prompt_cache)
            except PromptCacheError as e:
                console.error(str(e))
                raise typer.Exit(1) from None
        loading = Loading(settings)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    run(loading, settings)


@app.command()
def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(
            metavar="PROMPT", help="The prompt; read from stdin if absent.", show_default=False
        ),
    ] = None,
    model: Model = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Complete the prompt as is, without the chat template.")
    ] = False,
    think: Think = True,
    hide_thinking: HideThinking = False,
    system: System = None,
    prefill: Annotated[
        str | None,
        typer.Option(
            "--prefill",
            metavar="TEXT",
            help="Start the answer with TEXT and let the model continue it ('{' for JSON); "
            "TEXT is printed as part of the answer.",
        ),
    ] = None,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="text|json",
            help="text: the answer on stdout (thinking on stderr); json: one object with "
            "thinking, answer and stats.",
        ),
    ] = "text",
    max_tokens: MaxTokens = 8192,
    temperature: Temperature = None,
    top_p: TopP = None,
    seed: Seed = None,
    dtype: DType = "auto",
    stats: Annotated[
        bool, typer.Option("--stats/--no-stats", help="Print speed and memory on stderr.")
    ] = False,
    max_context: MaxContext = None,
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = 64,
    kv_start: KVStart = 0,
    prompt_lookup: PromptLookup = 0,
    think_budget: ThinkBudget = None,
    json_schema: Annotated[
        Path | None,
        typer.Option(
            "--json-schema",
            metavar="FILE",
            help="Hold the answer to the JSON Schema in FILE: it always parses (thinking stays "
            "free). Exit 1 if max-tokens cuts it before it is complete.",
        ),
    ] = None,
    memory_check: MemoryCheck = True,
) -> None:
    """Answer one prompt with the chat template (or complete it with --raw) and exit."""
    if output_format not in ("text", "json"):
        console.error(f"--format must be text or json, not {output_format}")
        raise typer.Exit(2)
    schema = _read_schema(json_schema) if json_schema is not None else None
    if prompt is None:
        try:
            prompt = console.read_prompt() if sys.stdin.isatty() else sys.stdin.read()
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    prompt, prefill = console.text(prompt, "the prompt"), _text(prefill, "--prefill")
    if not raw:
        prompt = prompt.strip()  # `echo question |` ends it with a newline
    if not prompt.strip():
        console.error("the prompt is empty")
        raise typer.Exit(1)
    if raw and prefill is not None:
        console.error(
            "--prefill opens the chat template's answer; with --raw, end the prompt with it"
        )
        raise typer.Exit(2)
    from ..constrain import ConstraintError
    from .oneshot import answer, check_context, complete

    try:
        settings = ChatSettings(
            model=model,
            dtype=dtype,
            think=think,
            system=_text(system, "--system"),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_context=max_context,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            kv_start=kv_start,
            prompt_lookup=prompt_lookup,
            think_budget=think_budget,
            memory_check=memory_check,
        )
        session = launch.open_chat(settings)
        check_context(session, prompt, raw, prefill)
        with console.prefill_progress() as progress:
            session.prompt_progress = progress
            if raw:
                parsed = complete(session, prompt, stats, output_format, schema)
            else:
                parsed = answer(
                    session, prompt, progress, output_format, hide_thinking, stats, schema, prefill
                )
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except ConstraintError as e:  # before any token
        console.error(f"{json_schema}: {e}")
        raise typer.Exit(1) from None
    if schema is not None and parsed is None:
        console.error("the answer was cut by --max-tokens before the JSON value was complete")
        raise typer.Exit(1)


def _read_schema(path: Path) -> dict:
    from ..files import parse_json

    try:
        schema = parse_json(path.read_text(encoding="utf-8"))  # nesting bounded
    except (OSError, UnicodeDecodeError, ValueError) as e:
        console.error(f"{path}: cannot read a JSON schema ({getattr(e, 'strerror', None) or e})")
        raise typer.Exit(1) from None
    if not isinstance(schema, dict):
        console.error(f"{path}: a JSON schema is an object, not {type(schema).__name__}")
        raise typer.Exit(1)
    return schema


@app.command()
def convert(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT", help="The folder to create.")],
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE", help="Hub repo id or local folder of a Hugging Face checkpoint."
        ),
    ] = "HuggingFaceTB/SmolLM3-3B",
    bits: Annotated[int, typer.Option(metavar="BITS", help="Bits per weight: 4 or 8.")] = 4,
    group_size: Annotated[
        int, typer.Option(metavar="N", help="Weights per scale: 32, 64 or 128.")
    ] = 64,
    recipe: Annotated[
        str | None,
        typer.Option(
            metavar="mixed|uniform|measured",
            help="mixed: the embedding / tied output head at 8 bits (the 4-bit default); "
            "uniform: --bits everywhere (the 8-bit default); measured: bits per matrix chosen "
            "by sensitivity for --target-bpw (the default with it).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(metavar="DTYPE", help="Of the scales, biases and norms: bfloat16 or float16."),
    ] = "bfloat16",
    revision: Annotated[
        str | None, typer.Option(metavar="REV", help="Hub revision: branch, tag or commit.")
    ] = None,
    upload_repo: Annotated[
        str | None,
        typer.Option(metavar="USER/NAME", help="Then upload the folder to this hub repo."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    target_bpw: Annotated[
        float | None, typer.Option(metavar="BPW", help="Bits per weight of the measured recipe.")
    ] = None,
    measure: Annotated[
        bool | None,
        typer.Option(
            "--measure/--no-measure",
            help="Measure what quantization cost (KL, top-1, perplexity) into the model card "
            "and quality.json. Default: on a GPU; on the CPU a sample (--measure-windows).",
            show_default=False,
        ),
    ] = None,
    measure_windows: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Measure this many windows of the text. Default: all on a GPU, 4 on the CPU.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Quantize SmolLM3 into an MLX folder that smollm3-mlx and mlx-lm both run."""
    from ..convert import ConvertError, ConvertInterrupted, convert as convert_model

    try:
        with console.progress("converting") as update:
            result = convert_model(
                source,
                out,
                bits=bits,
                group_size=group_size,
                recipe=recipe,
                dtype=dtype,
                revision=revision,
                upload_repo=upload_repo,
                force=force,
                progress=update,
                note=console.note,
                target_bpw=target_bpw,
                measure=measure,
                measure_windows=measure_windows,
            )
    except ConvertError as e:
        console.error(str(e))
        # As a shell reports a process a signal ended: 130 for Ctrl-C, 143 for SIGTERM.
        code = 128 + e.signum if isinstance(e, ConvertInterrupted) else 1
        raise typer.Exit(code) from None
    console.converted(result)
    if result.quality is not None:
        from ..quality import summary

        console.note(f"measured: {summary(result.quality)}")


@app.command("compare-models")
def compare_models(
    source: Annotated[str, typer.Argument(help="The reference model: folder or hub repo id.")],
    quantized: Annotated[str, typer.Argument(help="The model to measure against it.")],
    windows: Annotated[
        int | None,
        typer.Option(metavar="N", help="Only N windows, evenly spaced.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Measure how far a model is from another on the shipped held-out text: mean KL, top-1
    agreement, perplexity change, each with its standard error over windows."""
    from ..quality import QualityError, compare, summary

    try:
        q = compare(source, quantized, windows=windows)
    except QualityError as e:
        console.error(str(e))
        raise typer.Exit(1) from None
    print(json.dumps(q.to_json(), indent=2) if as_json else summary(q))


def _bytes(name: str, text: str) -> int:
    """'2G', '512M', '1000000' -> bytes; anything else is one line naming the option."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = float(number) * scale
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        console.error(f"{name} must be a size like 2G, 512M or 1000000, not {text!r}")
        raise typer.Exit(2)
    return int(value)


@app.command()
def serve(
    model: Model = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Port to listen on (0: any free one).",
            callback=in_range("--port", 0, 65535),
        ),
    ] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="SMOLLM3_MLX_API_KEY",
            help="Require Authorization: Bearer <key> on /v1 routes.",
            show_default=False,
        ),
    ] = None,
    allow_unauthenticated: Annotated[
        bool,
        typer.Option(
            "--allow-unauthenticated",
            help="Accept serving a non-loopback --host without an API key (an open server).",
        ),
    ] = False,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="A browser origin allowed to call the API (repeatable). Default: none."),
    ] = None,
    model_name: Annotated[
        str | None,
        typer.Option(
            help="The model id clients send (default: --model as given, or the "
            "default model's name).",
            show_default=False,
        ),
    ] = None,
    max_context: MaxContext = None,
    kv_bits: KVBits = None,
    cache_bytes: Annotated[
        str,
        typer.Option(help="Memory for prompt caches kept across requests (LRU), e.g. 2G, 512M."),
    ] = "2G",
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Keep prompt caches in this folder across restarts.",
            show_default=False,
        ),
    ] = None,
    cache_dir_bytes: Annotated[
        str, typer.Option(help="Disk budget for --cache-dir (least recently used go), e.g. 8G.")
    ] = "8G",
    queue: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Requests that may wait while the batch is full; beyond, 429.",
            callback=in_range("--queue", 0),
        ),
    ] = 8,
    max_batch: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Requests decoded together (default: the most the memory estimate allows: "
            "the weights, each one's KV cache at the whole context, activations).",
            show_default=False,
            callback=in_range("--max-batch", 1),
        ),
    ] = None,
    dtype: DType = "auto",
    memory_check: MemoryCheck = True,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (needs smollm3-mlx[server])."""
    budget, dir_budget = (
        _bytes("--cache-bytes", cache_bytes),
        _bytes("--cache-dir-bytes", cache_dir_bytes),
    )
    try:
        from ..serve.app import api_key_problem, exposure_problem, serve as run_server
        from ..serve.engine import WarmUpError
    except ImportError as e:
        console.error(f"serve needs the server extra: pip install 'smollm3-mlx[server]' ({e})")
        raise typer.Exit(1) from None
    if api_key_problem(api_key):  # a bad option value, as the others
        console.error(api_key_problem(api_key))
        raise typer.Exit(2)
    problem = exposure_problem(host, api_key, allow_unauthenticated)
    if problem:
        console.error(problem)
        raise typer.Exit(1)
    if cache_dir is not None:  # before the model's load, which can take a while
        try:
            cache_dir.expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as e:
            console.error(f"--cache-dir {cache_dir}: cannot use it as a folder ({e.strerror})")
            raise typer.Exit(2) from None
    m, tokenizer, name = _load(  # at least one row; --max-batch N rows when it is given
        model, dtype, max_context, kv_bits=kv_bits, check_memory=memory_check, batch=max_batch or 1
    )
    import mlx.core as mx

    with console.status("reading the weights"):
        mx.eval(m.parameters())
    name = model_name or (DEFAULT_MODEL_NAME if model is None else model)
    try:
        run_server(
            m, tokenizer, model_name=name, host=host, port=port, api_key=api_key,
            cors_origins=cors_origin or (), queue_size=queue, cache_bytes=budget,
            kv_bits=kv_bits, cache_dir=cache_dir, cache_dir_bytes=dir_budget, max_batch=max_batch,
            on_ready=lambda url: console.serving(url, name, api_key is not None),
        )  # fmt: skip
    except OSError as e:  # the port is taken, the address is not ours, ...
        console.error(f"cannot serve on {host}:{port}: {e}")
        raise typer.Exit(1) from None
    except WarmUpError as e:
        console.error(str(e))
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the signal
        console.info("server stopped")
        raise typer.Exit(130) from None
    console.info("server stopped")


@app.command("cache-prompt")
def cache_prompt(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="CACHE", help="The file to write.")],
    system: Annotated[
        Path, typer.Option(metavar="FILE", help="The system prompt, read from this file.")
    ],
    document: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="A document, appended to the system prompt."),
    ] = None,
    model: Model = None,
    think: Think = True,
    dtype: DType = "auto",
    max_context: MaxContext = None,
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = 64,
    kv_start: KVStart = 0,
    memory_check: MemoryCheck = True,
) -> None:
    """Prefill a long system prompt (and document) once into a file that chat --prompt-cache
    loads instead: use the same --model, --dtype, --max-context and --kv-* options there."""
    import time

    try:
        text = system.read_text(encoding="utf-8")
        if document is not None:
            text += "\n\n" + document.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        console.error(f"cannot read the prompt: {e}")
        raise typer.Exit(1) from None
    if not text.strip():
        console.error(f"{system}: the system prompt is empty: nothing to cache")
        raise typer.Exit(1)
    settings = ChatSettings(
        model=model,
        dtype=dtype,
        think=think,
        system=text.strip(),
        max_tokens=1,
        max_context=max_context,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        kv_start=kv_start,
        memory_check=memory_check,
    )
    session = launch.open_chat(settings)
    start = time.perf_counter()
    try:
        with console.status(
            f"prefilling {len(session.render(add_generation_prompt=False))} tokens"
        ):
            n = session.prefill()
        path = session.save_prompt_cache(out)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except OSError as e:
        console.error(f"{out}: {e.strerror or e}")
        raise typer.Exit(1) from None
    size = path.stat().st_size
    console.info(
        f"cached {n} tokens ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s: {path}"
    )


@app.command()
def estimate(
    model: Model = None,
    dtype: DType = "auto",
    max_context: MaxContext = None,
    kv_bits: KVBits = None,
    kv_group_size: KVGroupSize = 64,
    kv_start: KVStart = 0,
    prefill_step: Annotated[
        int | None,
        typer.Option(
            help="Prompt tokens per prefill chunk (default: what generation uses on the device: "
            "512 on a GPU, a few tokens of the 3B on the CPU).",
            show_default=False,
        ),
    ] = None,
    bits: Annotated[
        int | None,
        typer.Option(
            help="Estimate the weights `convert --bits` would write from this folder (one with "
            "only a config.json works too).",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="gpu or cpu (default: where MLX computes here).", show_default=False),
    ] = None,
    batch: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Rows decoded together, each with its KV cache (serve's --max-batch).",
            callback=in_range("--batch", 1),
        ),
    ] = 1,
) -> None:
    """Show the memory a chat session (or a batch of --batch) needs (weights, KV cache,
    activations) and what is free."""
    from ..checkpoint import ModelLoadError
    from ..hub import resolve_model_path
    from ..memory import available_memory, estimate_memory

    if device not in (None, "gpu", "cpu"):
        console.error(f"--device must be gpu or cpu, not {device}")
        raise typer.Exit(2)
    try:
        path = resolve_model_path(model) if model else default_model_dir()
        est = estimate_memory(
            path, max_context=max_context, kv_bits=kv_bits, kv_group_size=kv_group_size,
            kv_start=kv_start, prefill_step=prefill_step,
            dtype=compute_dtype(dtype), bits=bits, device=device, batch=batch,
        )  # fmt: skip
    except (ModelLoadError, ValueError, OSError) as e:
        console.error(str(e))
        raise typer.Exit(1) from None
    console.memory_estimate(est, available_memory())


@app.command()
def bench(
    model: Model = None,
    dtype: DType = "auto",
    prompt_tokens: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Prompt length (random tokens). Default: 512 on the GPU, 8 on the CPU.",
            show_default=False,
            callback=in_range("--prompt-tokens", 1),
        ),
    ] = None,
    generation_tokens: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Tokens to generate, greedy. Default: 128 on the GPU, 4 on the CPU.",
            show_default=False,
            callback=in_range("--generation-tokens", 1),
        ),
    ] = None,
    runs: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Timed runs; the medians are shown. Default: 3 on the GPU, 2 on the CPU.",
            show_default=False,
            callback=in_range("--runs", 1),
        ),
    ] = None,
    compare_mlx_lm: Annotated[
        bool,
        typer.Option(
            "--compare-mlx-lm",
            help="Also time mlx-lm on the same folder, alternating runs (needs mlx-lm: the compare "
            "extra). When it computes in another dtype by default (bfloat16 on the CPU), it is "
            "also timed cast to ours.",
        ),
    ] = False,
) -> None:
    """Measure prefill and decode speed, time to first token and peak memory on your model."""
    from ..bench import bench as measure, default_sizes, mlx_lm_runners, smollm3_runner

    sizes = default_sizes()
    prompt_tokens = prompt_tokens if prompt_tokens is not None else sizes[0]
    generation_tokens = generation_tokens if generation_tokens is not None else sizes[1]
    runs = runs if runs is not None else sizes[2]
    if compare_mlx_lm:
        try:
            import mlx_lm  # noqa: F401
        except ImportError:
            console.error("--compare-mlx-lm needs mlx-lm: pip install 'smollm3-mlx[compare]'")
            raise typer.Exit(1) from None
    m, tokenizer, name = _load(model, dtype)
    if prompt_tokens + generation_tokens >= m.max_context:
        console.error(f"prompt and generated tokens must fit in the context ({m.max_context})")
        raise typer.Exit(1)
    runners = [smollm3_runner(m, tokenizer)]
    if compare_mlx_lm:
        import mlx.core as mx

        ours = getattr(mx, runners[0].dtype, None)  # e.g. "float32"
        with console.status("loading it with mlx-lm"):
            runners += mlx_lm_runners(m.info.path, [None, *([ours] if ours else [])])
    what = f"{prompt_tokens} + {generation_tokens} tokens"
    try:
        with console.bench_progress(what, runs * len(runners)) as on_run:
            results = measure(
                runners,
                prompt_tokens=prompt_tokens,
                generation_tokens=generation_tokens,
                runs=runs,
                on_run=on_run,
            )
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.bench_results(name, results)


if __name__ == "__main__":
    app()
