"""distil's command line: a thin Typer front end over ``stages``."""
