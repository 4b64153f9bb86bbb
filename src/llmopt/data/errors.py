"""The one error type of `llmopt.data`: bad input named in one line, with the fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input: a missing, empty or undecodable file, a corrupt tokenizer, too little text.

    The message is one line that names the path (or the field) and says what to do instead, so the
    CLI can print it as is and exit with status 2.
    """
