"""The job's failures, each with the exit code of the README's table (Exit codes).

A JobError is a user error: its message is one line that names the variable or file and the fix,
and the job prints it without a traceback. Anything else is unexpected and exits 1 with one.
"""

import re

# scheme://user:password@host and ?query (presigned URLs' X-Amz-Signature, tokens). Neither match runs over a
# quote or a backslash, so that redacting a rendered JSON line leaves it valid JSON.
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/?#\"\\]*@")
_QUERY = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#\"'<>\\]*)\?[^\s#\"'<>\\]*")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """exc's message for a one-line error or warning: its first line, at most limit characters, or its class's name
    when it has none."""
    return (str(exc) or type(exc).__name__).splitlines()[0][:limit]


def redact(text: str) -> str:
    """text with the userinfo and the query string of every URL replaced by ***."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", text))


class JobError(Exception):
    exit_code = 1


class DatasetInvalid(JobError):
    exit_code = 65


class InputNotFound(JobError):
    exit_code = 66


class OutOfMemory(JobError):  # GPU or host memory
    exit_code = 70


class TemporaryFailure(JobError):
    exit_code = 75


class AccessDenied(JobError):
    exit_code = 77


class ConfigInvalid(JobError):
    exit_code = 78
    settings = None  # read_settings: what could still be read, enough to find OUTPUT_URI/RUN_ID for failure.json


class Preempted(JobError):
    """SIGTERM: the run stopped at a step boundary after committing a checkpoint, or outside training.
    fields (the step committed, the seconds it took) go into failure.json."""

    exit_code = 143

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.fields = fields


class Interrupted(Preempted):
    """SIGINT (Ctrl-C): as Preempted, with the shell's code for it (128 + 2)."""

    exit_code = 130
