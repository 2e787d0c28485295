"""The project's .deb for each Debian release, built once per test session.

A .deb installs on the release it was built on (packaging/build-deb.sh), so it is built in a
chroot of that release's cached tree, never on the host. The fresh-machine test builds one
anyway (tests/test_fresh_debian.py), from the working tree as it is, and hands it over with
``add``; ``get`` builds one only when no test did yet, in a chroot of the tree the live-systemd
tier boots (tests/nspawn.py). Either way it is ``packaging/build-deb.sh`` run on a copy of the
git-tracked files of this working tree.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .chroot import Chroot, base_tree, copy_repository

REPO_IN_CHROOT = "/root/remotefs"


class DebBuilds:
    """Session-wide: one .deb per suite in *directory*, with a note of where it came from."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.debs: dict[str, Path] = {}
        self.origins: dict[str, str] = {}

    def add(self, suite: str, deb: Path, how: str) -> Path:
        """Keep a copy of *deb*, built for *suite* (*how* says by whom, for the report)."""
        target = self.directory / suite / deb.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(deb, target)
        self.debs[suite] = target
        self.origins[suite] = how
        return target

    def get(self, suite: str, include: tuple[str, ...] = ()) -> Path:
        """The .deb for *suite*, built now in a chroot of the tree with *include* if needed.

        Call it outside ``base_tree()`` of that tree: building takes the tree's lock.
        """
        if suite not in self.debs:
            started = time.monotonic()
            with base_tree(suite, include) as tree:
                chroot = Chroot(tree, suite)
                try:
                    assert copy_repository(chroot.path(REPO_IN_CHROOT)) > 50
                    built = chroot.run(
                        f"cd {REPO_IN_CHROOT}\npackaging/build-deb.sh /root/dist", timeout=600
                    )
                    deb = built.stdout.strip().splitlines()[-1]
                    assert deb.startswith("/root/dist/remotefs_") and deb.endswith(".deb"), (
                        built.stdout
                    )
                    how = f"built in a chroot in {time.monotonic() - started:.0f} s"
                    self.add(suite, chroot.path(deb), how)
                finally:
                    chroot.close()
        return self.debs[suite]
