"""`python -m smollm3_mlx.cli` runs the command line, as the `smollm3-mlx` script does."""

from .app import app

app()
