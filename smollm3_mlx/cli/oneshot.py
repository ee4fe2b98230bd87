"""`generate`'s one answer: the turn through the chat template, or the raw completion, printed
as text or as one JSON object."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import typer

from ..events import Error, ToolCallError
from . import console


def answer(session, prompt, progress, output_format, hide_thinking, stats, schema, prefill):
    """One turn through the chat template, printed; the parsed value (with a schema)."""
    turn = session.send(prompt, prefill=prefill, response_format=schema)
    events = console.after_prefill(progress, turn)
    if output_format == "json":
        result = turn_json(events, parsed=schema is not None)
        console.write(json.dumps(result, ensure_ascii=False) + "\n")
        return result.get("parsed")
    view = console.TurnView(hide_thinking=hide_thinking, thinking_to=console.err, footer=stats)
    for event in events:
        view(event)
        if isinstance(event, Error):  # an allocation failure, shown by the view: exit 1
            raise typer.Exit(1)
    return event.parsed


def turn_json(events, parsed: bool = False) -> dict[str, Any]:
    """One turn as JSON: thinking, answer, the tool calls the model made (and any it wrote
    malformed), the parsed value (with `parsed`), why it ended and its stats."""
    errors = []
    for event in events:
        if isinstance(event, ToolCallError):
            errors.append({"text": event.text, "error": event.error})
    done = event
    if isinstance(done, Error):  # an allocation failure: one line, exit 1
        console.error(done.message)
        raise typer.Exit(1)
    calls = [{"name": c.name, "arguments": c.arguments} for c in done.tool_calls]
    result = {"thinking": done.thinking, "answer": done.answer, "tool_calls": calls}
    if errors:
        result["tool_call_errors"] = errors
    if parsed:
        result["parsed"] = done.parsed
    return result | {"finish_reason": done.finish_reason, "stats": asdict(done.stats)}


def check_context(session, prompt: str, raw: bool, prefill: str | None) -> None:
    """generate answers one prompt: one longer than the context is an error, not a rotation."""
    tok = session.tokenizer
    if raw:
        n = len(tok.encode(prompt, allow_special=True))
    else:
        messages = [*session.messages, {"role": "user", "content": prompt}]
        if prefill is not None:
            from ..chat_file import opened_answer

            messages.append(opened_answer(prefill))
        n = len(
            tok.apply_chat_template(
                messages,
                tokenize=True,
                enable_thinking=session.think,
                continue_final_message=prefill is not None,
            )
        )
    from ..checkpoint import longest_context

    limit, most = session.model.max_context, longest_context(session.model.args)
    if n >= limit:
        console.error(
            f"the prompt is {n} tokens, no room left to answer in the context of {limit}"
            + (f" (raise --max-context; this model allows up to {most})" if most > limit else "")
        )
        raise typer.Exit(1)


def complete(session, prompt: str, stats: bool, output_format: str, schema=None):
    from ..cache import PromptCache
    from ..generate import stream_generate

    last, text = None, ""
    responses = stream_generate(
        session.model,
        session.tokenizer,
        prompt,
        sampling=session.sampling,
        prompt_cache=PromptCache.new(session.model, kv=session.kv),
        prompt_lookup=session.prompt_lookup,
        prompt_progress=session.prompt_progress,
        response_format=schema,
    )
    for last in console.after_prefill(session.prompt_progress, responses):
        text += last.text
        if output_format == "text":
            console.write(last.text)
    if output_format == "json":
        result = {"text": text, "finish_reason": last.finish_reason, "stats": asdict(last)}
        del result["stats"]["text"], result["stats"]["token"], result["stats"]["parsed"]
        if schema is not None:
            result["parsed"] = last.parsed
        console.write(json.dumps(result, ensure_ascii=False) + "\n")
        return last.parsed
    console.write("\n")
    if stats and last is not None:
        console.stats(last)
    return last.parsed if last is not None else None
