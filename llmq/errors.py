"""The one exception type for a user's mistake.

`LlmqError` means "the input is wrong, here is what to do"; the CLI prints its message on one line and
exits 2. Any other exception is a bug in llmq and keeps its traceback.
"""


class LlmqError(Exception):
    """A user-facing error: the message names the bad input and what to do about it."""
