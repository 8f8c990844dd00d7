"""The exceptions the library raises on purpose. The CLI turns each into one line and exit code 1."""


class CxrError(Exception):
    """Base: the message says what is wrong and what to do."""


class DataError(CxrError):
    """The dataset cannot be used as given (missing, empty, one class, bad labels.csv...)."""


class ImageReadError(CxrError):
    """One image file cannot be decoded; callers that process many images skip and list it."""


class RunError(CxrError):
    """A run folder is missing, incomplete or would be overwritten."""


class ArtifactError(CxrError):
    """An exported model folder is missing, malformed, tampered with or from a newer format."""
