"""The one exception type users see.

Every problem a user can cause (a bad path, a malformed row, a config typo)
is raised as a TunelabError whose message is one paragraph naming the file,
row or config key and saying how to fix it. The CLI prints the message
without a traceback; Python callers can catch it.
"""


class TunelabError(Exception):
    """A user-facing error with a one-paragraph message."""
