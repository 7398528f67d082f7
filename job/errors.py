"""The job's failures, each with the exit code of the contract (shared/DESIGN.md, Exit codes).

A JobError is a user error: its message is one line that names the variable or file and the fix,
and the job prints it without a traceback. Anything else is unexpected and exits 1 with one.
"""


class JobError(Exception):
    exit_code = 1


class DatasetInvalid(JobError):
    exit_code = 65


class InputNotFound(JobError):
    exit_code = 66


class GpuOutOfMemory(JobError):
    exit_code = 70


class TemporaryFailure(JobError):
    exit_code = 75


class AccessDenied(JobError):
    exit_code = 77


class ConfigInvalid(JobError):
    exit_code = 78
