"""The names of the mount root's extended attributes that clients read (no pyfuse3 here).

``remotefs status`` and ``remotefs unmount`` find a mount's daemon through them; they import
this module, not `remotefs.fuse.ops`, so the command line works where pyfuse3 is not
installed (a library or serve-only installation).
"""

from __future__ import annotations

#: On the root: the daemon's pid (`remotefs unmount` waits for it to exit).
PID_XATTR = b"user.remotefs.pid"
#: On the root: the path of the daemon's control socket (`remotefs status` finds it here).
CONTROL_XATTR = b"user.remotefs.control"
