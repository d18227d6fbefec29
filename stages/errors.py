"""The one exception type that means "the user gave bad input".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""


class DistilError(Exception):
    """Bad input: the message names the problem and how to fix it, in one line (line breaks
    in what it quotes, a column named "a\\nb" say, are shown escaped)."""

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def one_of(setting: str, value, choices) -> None:
    """Refuse ``value`` for ``setting`` unless it is one of ``choices`` (names them all)."""
    if value not in choices:
        raise DistilError(f"unknown {setting} '{value}'; choose one of {', '.join(map(str, choices))}")
