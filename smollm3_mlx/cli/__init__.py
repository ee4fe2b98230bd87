"""The terminal face: typer commands (app), launch, repl, oneshot, console (all rich rendering),
editor."""
