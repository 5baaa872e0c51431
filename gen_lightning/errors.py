"""The base of errors that are about the user's input (a file, a key, an option), not a bug in gen_lightning.

The `gen-lightning` console script prints them as one line naming the culprit instead of a traceback; called from
Python (tests, notebooks) they stay ordinary exceptions. Each subclass also stays a ValueError for callers that
caught that before.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input: the message names the file, key or option and says what to do."""
