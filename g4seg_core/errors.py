"""The one exception type users see.

Every input a user can get wrong is checked before it reaches torch and raised as a
G4SegError whose message says what was wrong and how to fix it.
"""


class G4SegError(ValueError):
    """A problem with the user's input, files or models; the message names the fix."""


class ModelNotFoundError(G4SegError, FileNotFoundError):
    """No model weights were found; the message lists where we looked."""
