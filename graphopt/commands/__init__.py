"""Extra CLI commands. Each module here defines ``register(app: typer.Typer) -> None``; ``graphopt.cli``
imports every module in this package and calls it, so a feature adds its command without editing cli.py.
Command modules may print (they are CLI code); library code they call may not."""
