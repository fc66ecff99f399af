"""Audit plugins: measures that only a dataset with known ground truth allows, run by the audit
when asked and not otherwise.

The generic measures (replication after Gu et al. 2023, IET's MQ after Liu et al., ECCV 2024,
feature similarity after Somepalli et al. 2023, detection after Wen et al., ICLR 2024, and
Inception FID/KID) run on any model and training folder. A plugin adds what its dataset can
score: the shapes benchmark (`memguard.audit_plugins.shapes`) judges attributes and the
sensitive concept, attacks the concept, and names its planted duplicates, the targets of the
audit's attacks on memorized images (`memguard.audit_attacks`).

A plugin is selected by name, with `--benchmark NAME` (the AuditConfig key `benchmark`), or by
the dataset's own declaration: `"benchmark": NAME` in the `dataset.json` of the folder that
holds the training folder (what `memguard data shapes` writes). `--benchmark off` switches a
declared plugin off. A file that merely sits there, without the declaration, selects nothing.
Plugin modules are imported only when selected, so the generic measures never import them.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from memguard.config import ConfigError

if TYPE_CHECKING:
    from memguard.audit import Auditor, PromptKinds
    from memguard.data.folder import ImageFolderDataset
    from memguard.metrics.similarity import Descriptor
    from memguard.report.summary import Row

DECLARATION = "dataset.json"
PLUGINS = {"shapes": "memguard.audit_plugins.shapes:ShapesBenchmark"}  # name -> module:class
OFF = "off"


class AuditPlugin(ABC):
    """Measures for one kind of dataset, written under `results["benchmark"]`."""

    name: ClassVar[str]

    def setup(self, auditor: Auditor) -> None:  # noqa: B027 (optional)
        """Check the dataset and load what the measures need, before anything is sampled."""

    def descriptor(self) -> Descriptor | None:
        """Image features for the similarity measure when the audit is given no SSCD file."""
        return None

    def planted_duplicates(self, train: ImageFolderDataset) -> list[int]:
        """Indices of training images the dataset planted to be memorized, one per distinct
        image (the targets of `memguard audit --attacks`); none by default."""
        return []

    @abstractmethod
    def measure(
        self,
        auditor: Auditor,
        train: ImageFolderDataset,
        samples: ImageFolderDataset,
        kinds: PromptKinds,
    ) -> dict:
        """The plugin's figures (a JSON-ready dict); `train`: the training folder, `samples`:
        the generations replication was measured on, `kinds`: the prompt kinds."""

    @staticmethod
    @abstractmethod
    def summary_rows(section: dict) -> list[Row]:
        """The rows of the audit's summary for the section `measure` wrote."""


def plugin_class(name: str) -> type[AuditPlugin]:
    """The plugin registered as `name`; an unknown name is a ConfigError naming the known."""
    if name not in PLUGINS:
        known = ", ".join([*PLUGINS, OFF])
        raise ConfigError(f"benchmark: unknown audit plugin {name!r} (known: {known})")
    module, cls = PLUGINS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def declared(train_data_dir: str | Path) -> tuple[str, Path] | None:
    """(name, file) of the plugin the training folder's dataset declares, or None."""
    path = Path(train_data_dir).resolve().parent / DECLARATION
    if not path.is_file():
        return None
    name = json.loads(path.read_text()).get("benchmark")
    return (name, path) if name is not None else None


def selected(benchmark: str | None, train_data_dir: str | Path) -> tuple[str, str] | None:
    """(name, how it was selected) of the audit's plugin, or None: `benchmark` (the config
    key; "off": no plugin), else the dataset's declaration."""
    if benchmark == OFF:
        return None
    if benchmark is not None:
        plugin_class(benchmark)
        return benchmark, "--benchmark"
    declaration = declared(train_data_dir)
    if declaration is None:
        return None
    name, path = declaration
    plugin_class(name)
    return name, f"declared in {path}"
