"""Per-app context: settings, the dataset store and the job manager, built by ``build_app``.

Nothing here is module-level state: each app (and each test) builds its own context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from studio.catalog import Catalog
from studio.config import Settings


@dataclass
class StudioContext:
    settings: Settings = field(default_factory=Settings.from_env)

    @cached_property
    def store(self):
        from studio.dataset import Store
        return Store(self.settings.workspace, max_pixels=self.settings.max_pixels)

    @cached_property
    def jobs(self):
        from functools import partial

        from studio.jobs import JobManager
        from studio.paths import confine_request
        # every job request's path fields inside the data roots (a backstop behind each tab's check)
        return JobManager(self.settings.workspace / "jobs.db",
                          check_request=partial(confine_request, roots=self.settings.roots))

    def catalog(self) -> Catalog:
        """Built-in catalog extended with the labels found in the dataset."""
        store = self.store
        return Catalog().with_labels({p: store.labels(p) for p in store.products()})

    def product_names(self) -> list[str]:
        """Products that have images first (the ones a user can annotate), then the catalog."""
        in_store = self.store.products()
        return in_store + [p for p in Catalog().names() if p not in in_store]
