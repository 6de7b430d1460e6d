"""Runner choice and settings: `harness.toml` (or --config), then CLI overrides.

    [runner]
    kind = "docker"            # local | docker | apptainer | slurm
    resume_retries = 2         # a stage stopped by a failure of ours resumes this often

    [runner.local]             # limits only: the local runner is NOT a sandbox
    memory_gb = 64

    [runner.docker]
    image = "bitlinear-harness:cpu"
    memory = "16g"

    [runner.slurm]
    partition = "gpu"
    wrap = "apptainer"         # none | apptainer: what the sbatch script runs the stage in

    [runner.apptainer]
    image = "/shared/images/bitlinear-harness.sif"

    [runner.leases]            # which of this host's GPUs stages may take (harness/leases.py)
    gpus = ["0", "1", "2", "3"]
    cpu_slots = 0

Unknown keys are refused with the file and the key named: a typo must not silently fall back
to a default that runs untrusted code differently than intended.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from harness.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "HARNESS_CONFIG"
DEFAULT_CONFIG = "harness.toml"
KINDS = ("local", "docker", "apptainer", "slurm")


@dataclass(frozen=True)
class LocalSettings:
    """Limits the local runner sets on each stage (setrlimit, inherited by every rank). The
    local runner is still no sandbox: these bound accidents, not an attacker."""

    memory_gb: float = 0.0  # RLIMIT_DATA per process (heap and anonymous maps); 0: none
    file_size_gb: float = 64.0  # RLIMIT_FSIZE: the largest file a stage may write
    open_files: int = 4096  # RLIMIT_NOFILE
    core_dumps: bool = False  # RLIMIT_CORE 0: no multi-GB core files in the attempt


@dataclass(frozen=True)
class DockerSettings:
    image: str = "bitlinear-harness:cpu"
    python: str = "python3"  # the interpreter inside the image
    # Hard limit per stage, capped below the machine's; an OOM kill at it is the submission's
    # when the scale has a measured peak it leaves 1.5 x room for (harness/runners/memory.py).
    memory: str = "16g"
    cpus: float = 2.0
    pids: int = 4096
    shm_size: str = "2g"  # torch's DataLoader and NCCL want more than docker's 64 MB
    user: str = ""  # uid:gid inside; "" = the invoking user, or 65534 (nobody) for root
    base_url: str = ""  # Docker Engine API; "" = DOCKER_HOST or the local socket


@dataclass(frozen=True)
class ApptainerSettings:
    image: str = "bitlinear-harness.sif"
    python: str = "python3"
    executable: str = "apptainer"


@dataclass(frozen=True)
class SlurmSettings:
    partition: str = ""
    account: str = ""
    qos: str = ""
    wrap: str = "none"  # none | apptainer
    cpus_per_task: int = 0  # 0: leave it to the cluster's default
    mem: str = ""
    time_margin_s: int = 600  # Slurm's limit = the stage's time limit + this margin
    extra_args: tuple[str, ...] = ()  # more #SBATCH lines, e.g. "--constraint=h200"
    poll_s: float = 2.0
    max_poll_s: float = 30.0


@dataclass(frozen=True)
class LeaseSettings:
    """The host's pools of device slots that the local, docker and apptainer runners lease
    stages from (harness/leases.py)."""

    enabled: bool = True
    gpus: tuple[str, ...] = ()  # GPU ids to hand out; (): CUDA_VISIBLE_DEVICES or nvidia-smi
    cpu_slots: int = 0  # >0: CPU stages lease nproc_per_node of this many slots too
    dir: str = ""  # "": $HARNESS_LEASE_DIR, else a per-user folder in the temp dir


@dataclass(frozen=True)
class RunnerConfig:
    kind: str = "local"
    # How often a stage stopped by a failure of ours (a killed rank, a lost node, a stall) is
    # resumed from its last checkpoint within the same attempt, by every runner alike.
    resume_retries: int = 2
    local: LocalSettings = field(default_factory=LocalSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    apptainer: ApptainerSettings = field(default_factory=ApptainerSettings)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    leases: LeaseSettings = field(default_factory=LeaseSettings)
    source: str = "defaults"  # where the settings came from, for result.json


def _section(cls: type[Any], table: object, where: str) -> Any:
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table", where=where)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise UserError(f"unknown setting {unknown[0]!r} in {where}", where=where,
                        fix=f"known settings: {', '.join(sorted(known))}")
    values = dict(table)
    for name, value in values.items():
        default = getattr(cls(), name)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"{where}.{name} must be a list of strings", where=where)
            values[name] = tuple(value)
        elif isinstance(default, float) and type(value) is int:
            values[name] = float(value)
        elif type(value) is not type(default):
            raise UserError(f"{where}.{name} must be a {type(default).__name__}, got {value!r}",
                            where=where)
    return cls(**values)


def parse_config(data: dict[str, Any], source: str) -> RunnerConfig:
    unknown = sorted(set(data) - {"runner"})
    if unknown:
        raise UserError(f"unknown table {unknown[0]!r} in {source}", where=source,
                        fix="the runner settings live under [runner]")
    runner = data.get("runner", {})
    if not isinstance(runner, dict):
        raise UserError("[runner] must be a table", where=source)
    top = {k: v for k, v in runner.items() if not isinstance(v, dict)}
    bad = sorted(set(top) - {"kind", "resume_retries"}) + sorted(
        set(k for k, v in runner.items() if isinstance(v, dict))
        - {"local", "docker", "apptainer", "slurm", "leases"})
    if bad:
        raise UserError(f"unknown setting {bad[0]!r} in [runner]", where=source,
                        fix="known: kind, resume_retries, [runner.local], [runner.docker], "
                            "[runner.apptainer], [runner.slurm], [runner.leases]")
    retries = top.get("resume_retries", 2)
    if type(retries) is not int or not 0 <= retries <= 100:
        raise UserError(f"[runner] resume_retries = {retries!r}", where=source,
                        fix="a whole number from 0 (never resume) to 100")
    config = RunnerConfig(
        kind=str(top.get("kind", "local")), resume_retries=retries,
        local=_section(LocalSettings, runner.get("local", {}), f"{source} [runner.local]"),
        docker=_section(DockerSettings, runner.get("docker", {}), f"{source} [runner.docker]"),
        apptainer=_section(ApptainerSettings, runner.get("apptainer", {}),
                           f"{source} [runner.apptainer]"),
        slurm=_section(SlurmSettings, runner.get("slurm", {}), f"{source} [runner.slurm]"),
        leases=_section(LeaseSettings, runner.get("leases", {}), f"{source} [runner.leases]"),
        source=source)
    return validated(config)


def validated(config: RunnerConfig) -> RunnerConfig:
    if config.kind not in KINDS:
        raise UserError(f"unknown runner {config.kind!r}", where=config.source,
                        fix=f"choose one of {', '.join(KINDS)}")
    if not 0 <= config.leases.cpu_slots <= 4096:
        raise UserError(f"[runner.leases] cpu_slots = {config.leases.cpu_slots}",
                        where=config.source, fix="0 (CPU stages lease nothing) up to 4096")
    if len(set(config.leases.gpus)) != len(config.leases.gpus) or \
            not all(g.strip() for g in config.leases.gpus):
        raise UserError(f"[runner.leases] gpus = {list(config.leases.gpus)}: ids must be "
                        "distinct and not empty", where=config.source,
                        fix='list the GPU ids once each, e.g. gpus = ["0", "1"]')
    if config.slurm.wrap not in ("none", "apptainer"):
        raise UserError(f"[runner.slurm] wrap = {config.slurm.wrap!r}", where=config.source,
                        fix="wrap is 'none' or 'apptainer'")
    return config


def load_config(path: Path | None = None) -> RunnerConfig:
    """--config, else $HARNESS_CONFIG, else ./harness.toml when present, else defaults."""
    explicit = path or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    candidate = explicit or Path(DEFAULT_CONFIG)
    if not candidate.is_file():
        if explicit is not None:
            raise UserError("no such config file", where=str(explicit),
                            fix="pass an existing harness.toml, or none for the defaults")
        return RunnerConfig()
    try:
        data = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot read the config: {e}", where=str(candidate)) from e
    return parse_config(data, str(candidate))


def with_overrides(config: RunnerConfig, *, kind: str | None = None,
                   image: str | None = None) -> RunnerConfig:
    """CLI overrides: --runner and --image (the image of whichever runner uses one)."""
    if kind:
        config = replace(config, kind=kind)
    if image:
        config = replace(config, docker=replace(config.docker, image=image),
                         apptainer=replace(config.apptainer, image=image))
    return validated(config)
