"""Where a run's files live: the one test for "is this a URI", and a run's paths computed once from its config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from galaxalign_dist import config as config_mod
from galaxalign_dist.config import Config


def is_uri(path: str | Path) -> bool:
    """Whether `path` is a URI (``s3://``, ``gs://``, ``file://``, ...) rather than a local path."""
    return "://" in str(path)


def absolute(path: str | Path) -> str:
    """A local path made absolute (Ray workers and trials do not run in the driver's cwd); a URI as given."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def absolute_paths(cfg: Config) -> Config:
    """The config with its local paths (data.path, run.out_dir) made absolute; URIs untouched."""
    data = cfg.to_dict()
    for section, key in (("data", "path"), ("run", "out_dir")):
        if data[section][key]:
            data[section][key] = absolute(data[section][key])
    return config_mod.from_dict(data, validate=False)  # validated where it was loaded


@dataclass(frozen=True)
class RunPaths:
    """A run's storage (Ray Train's storage_path) and the files it writes there."""

    storage: str  # absolute local directory, NFS path or URI
    name: str

    @classmethod
    def of(cls, cfg: Config) -> RunPaths:
        return cls(storage=absolute(cfg.run.out_dir), name=cfg.run.name)

    @property
    def run_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def local(self) -> bool:
        """TensorBoard event files and metrics.jsonl are written only to a local or shared-filesystem run dir."""
        return not is_uri(self.storage)

    @property
    def tensorboard(self) -> str:
        return f"{self.run_dir}/tensorboard"

    @property
    def metrics_file(self) -> str:
        return f"{self.run_dir}/metrics.jsonl"

    @property
    def config_file(self) -> str:
        return f"{self.run_dir}/config.yaml"
