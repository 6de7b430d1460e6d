"""The three kinds of failure, and how each reaches the user.

UserError: bad input from the user or a submission; one readable message, exit code 2.
InfraError: our side failed (runner, image, node, disk); the attempt is not the
submission's fault and its budget is refunded. Exit code 3.
Anything else is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_USER = 2
EXIT_INFRA = 3


class HarnessError(Exception):
    """Base of the errors the CLI turns into a clean message."""

    exit_code = 1


class UserError(HarnessError):
    """What went wrong, where, and how to fix it."""

    exit_code = EXIT_USER

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None,
                 details: str | None = None) -> None:
        self.what = what
        self.where = where
        self.fix = fix
        self.details = details
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        parts = [head]
        if self.fix:
            parts.append(f"  fix: {self.fix}")
        if self.details:
            parts.append(self.details.rstrip("\n"))
        return "\n".join(parts)


@dataclass(frozen=True)
class Finding:
    """One static-check or splice finding: a rule id, a place and one sentence."""

    rule: str
    line: int
    col: int
    message: str

    def render(self) -> str:
        return f"{self.rule} {self.line}:{self.col} {self.message}"


class CheckFailed(UserError):
    """A submission broke one or more rules; every finding is listed."""

    def __init__(self, findings: list[Finding], *, where: str | None = None) -> None:
        self.findings = findings
        lines = "\n".join(f"  {f.render()}" for f in findings)
        n = len(findings)
        super().__init__(
            f"{n} rule violation{'s' if n != 1 else ''} in the submission",
            where=where,
            details=lines,
        )


class InfraError(HarnessError):
    """Our side failed; never the submission's fault."""

    exit_code = EXIT_INFRA
