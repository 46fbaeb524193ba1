"""Command-line interface: argument parsing from config dataclasses, one module per command group."""
