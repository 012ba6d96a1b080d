"""The one exception type users see. Messages name the file, tensor or token, and say what to do."""


class VocabdriftError(Exception):
    """A problem with the user's input: bad file, mismatched models, unknown token.

    The CLI prints it as one line and exits 2; anything else is a bug: one line and exit code 70, with the
    traceback when VOCABDRIFT_DEBUG=1 (never exit 1, which `check` uses for "drift found").
    """
